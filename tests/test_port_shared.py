"""Modules registered under several names and frozen tables the Flax twin computes: a tiny
encoder-decoder built like Pegasus/Marian/Blenderbot (one nn.Embedding object as ``shared`` and
as each tower's ``embed_tokens``, a frozen sinusoid position table): ported once, refilled under
every name, strict loads, gradients judged as the sum over uses."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import weight_port as wp
from parity.judge import judge
from parity.tolerances import FORWARD, tolerance_for
from weight_port.plan import build_plan

V, D, T = 11, 6, 5
IDS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])


def sinusoids(n: int, d: int) -> np.ndarray:
    pos = np.arange(n)[:, None] / 10000 ** (2 * (np.arange(d) // 2) / d)
    return np.where(np.arange(d) % 2 == 0, np.sin(pos), np.cos(pos))


class Tower(torch.nn.Module):
    def __init__(self, embed: torch.nn.Embedding):
        super().__init__()
        self.embed_tokens = embed
        self.proj = torch.nn.Linear(D, D)

    def forward(self, ids):
        return self.proj(self.embed_tokens(ids))


class Seq2Seq(torch.nn.Module):
    """``shared`` is also ``encoder.embed_tokens`` and ``decoder.embed_tokens`` (the same module
    object); ``positions`` is a frozen sinusoid table. shared_first=False registers the towers
    first, so torch's first name for the embedding is ``encoder.embed_tokens``."""

    def __init__(self, shared_first: bool = True, positions: str = "frozen"):
        super().__init__()
        embed = torch.nn.Embedding(V, D)
        if shared_first:
            self.shared = embed
        self.encoder, self.decoder = Tower(embed), Tower(embed)
        if not shared_first:
            self.shared = embed
        table = torch.tensor(sinusoids(T, D), dtype=torch.float32)
        if positions == "buffer":
            self.register_buffer("positions", table)
        else:
            self.positions = torch.nn.Parameter(table, requires_grad=positions == "trainable")

    def forward(self, ids):
        return self.decoder(ids) * self.encoder(ids) + self.positions[: ids.shape[1]]


class FlaxTower(nn.Module):
    embed_tokens: nn.Module

    def setup(self):
        self.proj = nn.Dense(D)

    def __call__(self, ids):
        return self.proj(self.embed_tokens(ids))


class FlaxSeq2Seq(nn.Module):
    """One Embed leaf (params/shared/embedding) used by both towers; the table computed in code."""

    def setup(self):
        self.shared = nn.Embed(V, D)
        self.encoder, self.decoder = FlaxTower(self.shared), FlaxTower(self.shared)

    def __call__(self, ids):
        table = jnp.asarray(sinusoids(T, D), dtype=jnp.float32)
        return self.decoder(ids) * self.encoder(ids) + table[: ids.shape[1]]


class FlaxStoredTable(FlaxSeq2Seq):
    """The same twin storing the table as a parameter (as Whisper's Flax twin does)."""

    def setup(self):
        super().setup()
        self.positions = self.param("positions", nn.initializers.zeros, (T, D))

    def __call__(self, ids):
        return self.decoder(ids) * self.encoder(ids) + self.positions[: ids.shape[1]]


ALIASES = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}


def _strict_round_trip(t: torch.nn.Module, variables, plan) -> None:
    back = wp.flax_to_torch(variables, t, plan=plan)
    sd = t.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    fresh = Seq2Seq()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(back, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))


def test_module_under_three_names_ported_once_refilled_under_every_name():
    t = Seq2Seq()
    sd = t.state_dict()
    assert {"shared.weight", *ALIASES} <= set(sd)  # torch lists the module under every name
    plan = build_plan(t, FlaxSeq2Seq(), IDS, input_layout=wp.AS_IS)
    assert plan.tied == ALIASES
    variables = plan.to_flax(sd)
    assert set(variables["params"]) == {"shared", "encoder", "decoder"}
    assert set(variables["params"]["encoder"]) == {"proj"}  # the embedding has one leaf
    out = FlaxSeq2Seq().apply(variables, IDS.numpy())
    with torch.no_grad():
        c = judge("out", np.asarray(out), t(IDS).numpy(), tolerance_for("float32", FORWARD), layout=wp.AS_IS)
    assert c.ok, str(c)
    _strict_round_trip(t, variables, plan)


def test_module_paired_by_another_of_its_names():
    """torch's first name is ``encoder.embed_tokens``; the twin calls it ``shared``."""
    t = Seq2Seq(shared_first=False)
    plan = build_plan(t, FlaxSeq2Seq(), IDS, input_layout=wp.AS_IS)
    layer = next(lay for lay in plan.layers if lay.info.flax_path == ("shared",))
    assert layer.info.torch_path == "encoder.embed_tokens"
    assert "alias shared" in layer.matched and plan.pairing_notes == []
    assert plan.tied == {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
                         "shared.weight": "encoder.embed_tokens.weight"}
    variables = plan.to_flax(t.state_dict())
    np.testing.assert_array_equal(np.asarray(variables["params"]["shared"]["embedding"]),
                                  t.shared.weight.detach().numpy())


@pytest.mark.parametrize("placed", [False, True], ids=["host", "placed"])
@pytest.mark.parametrize("kept", ["shared.weight", "decoder.embed_tokens.weight"])
def test_checkpoint_storing_one_name_only(kept, placed):
    """A file checkpoint keeps one name of a shared tensor (save_pretrained drops the others);
    also when each tensor is placed on its sharding as it is converted (weight_port.streaming)."""
    import jax

    t = Seq2Seq()
    sd = {k: v for k, v in t.state_dict().items() if k not in {"shared.weight", *ALIASES} - {kept}}
    kw = dict(sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])) if placed else {}
    variables = wp.torch_to_flax(sd, FlaxSeq2Seq(), IDS, input_layout=wp.AS_IS, torch_module=t, **kw)
    np.testing.assert_array_equal(np.asarray(variables["params"]["shared"]["embedding"]),
                                  t.shared.weight.detach().numpy())


def test_shared_module_passes_the_check_with_summed_gradients():
    r = parity.check(Seq2Seq(), FlaxSeq2Seq(), IDS, dtype="float64")
    assert r.ok, r
    assert "grad shared.weight" in {c.name for c in r.param_grads}  # the sum over both towers
    assert any("shared.weight is tied" in n for row in r.layers for n in row.notes)


def test_shared_module_with_a_wrong_use_fails():
    class Wrong(FlaxSeq2Seq):
        def __call__(self, ids):
            table = jnp.asarray(sinusoids(T, D), dtype=jnp.float32)
            return self.decoder(ids) * self.encoder(ids + 1) + table[: ids.shape[1]]

    r = parity.check(Seq2Seq(), Wrong(), IDS, dtype="float64", layers=False)
    assert not r.ok


# -- frozen computed tables ----------------------------------------------------------------------
def test_frozen_table_the_twin_computes_is_skipped_with_a_note():
    t = Seq2Seq()
    plan = build_plan(t, FlaxSeq2Seq(), IDS, input_layout=wp.AS_IS)
    assert len(plan.notes) == 1 and plan.notes[0].startswith("torch positions: frozen (requires_grad=False)")
    assert plan.notes[0] in str(plan)  # printed with the plan
    variables = plan.to_flax(t.state_dict())
    _strict_round_trip(t, variables, plan)  # refilled from the torch module


def test_frozen_table_the_twin_stores_is_ported():
    t = Seq2Seq()
    plan = build_plan(t, FlaxStoredTable(), IDS, input_layout=wp.AS_IS)
    assert plan.notes == []
    variables = plan.to_flax(t.state_dict())
    np.testing.assert_array_equal(np.asarray(variables["params"]["positions"]), t.positions.detach().numpy())


@pytest.mark.parametrize("positions", ["trainable", "buffer"])
def test_trainable_or_buffer_table_without_a_leaf_stays_an_error(positions):
    """Only a frozen parameter is a computed table: a trainable one or a buffer is state."""
    t = Seq2Seq(positions=positions)
    with pytest.raises(wp.KeyMismatchError, match="torch positions"):
        wp.torch_to_flax(t, FlaxSeq2Seq(), IDS, input_layout=wp.AS_IS)


def example() -> torch.Tensor:
    return IDS


def test_port_command_prints_the_skipped_table(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from parity.cli import main

    monkeypatch.chdir(Path(__file__).parent)
    assert main(["port", "--torch", "test_port_shared:Seq2Seq", "--flax", "test_port_shared:FlaxSeq2Seq",
                 "--example-input", "test_port_shared:example", "--out", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "note: torch positions: frozen (requires_grad=False)" in out


def test_state_dict_port_of_a_computed_table_points_to_torch_module():
    """From a bare state_dict nothing says the table is frozen: the error says what would."""
    t = Seq2Seq()
    with pytest.raises(wp.KeyMismatchError) as err:
        wp.torch_to_flax(t.state_dict(), FlaxSeq2Seq(), IDS, input_layout=wp.AS_IS)
    assert "torch positions" in str(err.value) and "pass torch_module=" in err.value.hint
    wp.torch_to_flax(t.state_dict(), FlaxSeq2Seq(), IDS, input_layout=wp.AS_IS, torch_module=t)
