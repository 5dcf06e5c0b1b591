"""parity.runtime.tree: pytrees flatten to readable leaf paths, the same on both frameworks."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity.runtime import as_args, flatten, map_with_path, structure


def test_tuple_with_none_keeps_indices_and_drops_none():
    a, b = torch.zeros(1), torch.ones(2)
    flat = flatten((a, None, (b, None)))
    assert list(flat) == ["out[0]", "out[2][0]"]
    assert flat["out[2][0]"] is b


def test_dict_and_nested():
    flat = flatten({"logits": np.zeros(2), "aux": [np.ones(1), {"x": np.ones(3)}]})
    assert list(flat) == ["out['logits']", "out['aux'][0]", "out['aux'][1]['x']"]


def test_dataclass_fields_are_attributes():
    @dataclasses.dataclass
    class Out:
        logits: object
        hidden: object = None

    assert list(flatten(Out(np.zeros(1)))) == ["out.logits"]


def test_hf_model_output_same_paths_on_both_sides():
    from transformers.modeling_flax_outputs import FlaxBaseModelOutputWithPooling
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3), pooler_output=torch.ones(2))
    f = FlaxBaseModelOutputWithPooling(last_hidden_state=jnp.zeros((2, 3)), pooler_output=jnp.ones(2))
    assert list(flatten(t)) == list(flatten(f)) == ["out.last_hidden_state", "out.pooler_output"]


def test_map_with_path_rebuilds_the_same_structure():
    tree = ({"a": np.ones(2)}, None, [np.zeros(1)])
    out = map_with_path(lambda p, x: p, tree)
    assert out == ({"a": "out[0]['a']"}, None, ["out[2][0]"])


def test_structure_names_every_leaf():
    assert structure((np.zeros(1), {"k": np.zeros(1)})) == "{out[0], out[1]['k']}"


@pytest.mark.parametrize("x, n", [(np.zeros(1), 1), ((np.zeros(1), np.zeros(1)), 2), ({"a": 1}, 1)])
def test_as_args(x, n):
    assert len(as_args(x)) == n


def test_output_paths_match_across_field_and_key_spellings():
    """One matcher for check, verify and the logit metrics: a torch ModelOutput field and a Flax
    dict key are one leaf; a leaf without a partner means the structures differ."""
    from parity.runtime import canonical_path, match_outputs

    assert canonical_path("out['logits']") == canonical_path("out.logits") == "out.logits"
    assert canonical_path("out['a'][0]['b']") == "out.a[0].b"
    assert match_outputs(["out['logits']", "out['hidden']"], ["out.hidden", "out.logits"]) == {
        "out['logits']": "out.logits", "out['hidden']": "out.hidden"}
    assert match_outputs(["out"], ["out"]) == {"out": "out"}
    assert match_outputs(["out['logits']"], ["out.logits", "out.hidden"]) is None  # torch has one more
    assert match_outputs(["out['logits']", "out['x']"], ["out.logits"]) is None  # flax has one more
