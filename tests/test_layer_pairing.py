"""Per-layer rows on correct pairs written the way people write twins: an nn.Sequential spelled as a
list in ``setup`` or built inline in a compact method, an inner module returning channels-first
maps, work done inside a module on one side and after it on the other, a parent that wires its
child wrong. A correct pair PASSes; a planted bug is named where it is."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers.utils import ModelOutput

import parity
import weight_port


def _x(*shape):
    return np.random.default_rng(0).standard_normal(shape)


def _bn(c: int):
    # torch momentum 0.1 weighs the new batch; Flax momentum 0.9 weighs the old average.
    return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)


# -- a. an nn.Sequential the Flax twin spells otherwise ---------------------------------------------
class TorchBlock(torch.nn.Module):
    def __init__(self, cin: int = 3, cout: int = 4):
        super().__init__()
        self.main = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.main(x) + self.shortcut(x))


class TorchResNetish(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TorchBlock()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x).mean((2, 3)))


class FlaxBlockLists(nn.Module):
    """Each Sequential as a list of layers in setup: main_0, main_2, shortcut_0, shortcut_1."""

    def setup(self) -> None:
        self.main = [nn.Conv(4, (3, 3), padding=1), nn.relu, nn.Conv(4, (3, 3), padding=1)]
        self.shortcut = [nn.Conv(4, (1, 1)), _bn(4)]

    def __call__(self, x):
        h, s = x, x
        for layer in self.main:
            h = layer(h)
        for layer in self.shortcut:
            s = layer(s)
        return nn.relu(h + s)


class FlaxBlockInline(nn.Module):
    """Each Sequential built inline, the shortcut first: Sequential_0 is torch's shortcut."""

    @nn.compact
    def __call__(self, x):
        s = nn.Sequential([nn.Conv(4, (1, 1)), _bn(4)])(x)
        h = nn.Sequential([nn.Conv(4, (3, 3), padding=1), nn.relu, nn.Conv(4, (3, 3), padding=1)])(x)
        return nn.relu(h + s)


class FlaxResNetish(nn.Module):
    block: type

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="classifier")(self.block(name="stage")(x).mean((1, 2)))


def _resnetish() -> TorchResNetish:
    torch.manual_seed(0)
    tm = TorchResNetish()
    with torch.no_grad():  # running statistics that matter
        bn = tm.block.shortcut[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return tm


@pytest.mark.parametrize("block", [FlaxBlockLists, FlaxBlockInline], ids=["lists-in-setup", "inline-sequential"])
def test_sequential_spelled_otherwise_is_paired_only_with_what_holds_its_layers(block):
    # Without it, block.main and block.shortcut were paired with the whole Flax block (the path
    # their children share): a shape-mismatch FAIL on a pair whose outputs and gradients agree.
    r = parity.check(_resnetish(), FlaxResNetish(block), _x(2, 3, 6, 6), dtype="float64")
    assert r.ok, str(r)
    for name in ("block.main", "block.shortcut"):
        row = r.layer(name)
        if block is FlaxBlockLists:  # no Flax module holds exactly these layers
            assert row.paired_by is None and row.accumulated is None, row
        else:  # the inline Sequential that holds them, compared through the model
            assert row.paired_by == "layers", row
            assert row.flax_path == ("stage/Sequential_0" if name == "block.shortcut" else "stage/Sequential_1")
            assert row.accumulated is not None and row.accumulated.ok, row


class TorchFlattened(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten())
        self.head = torch.nn.Linear(4 * 5 * 5, 2)

    def forward(self, x):
        return self.head(self.features(x))


class FlaxConvStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(4, (3, 3), padding=1, name="conv")(x))


class FlaxFlattened(nn.Module):
    def setup(self) -> None:
        self.features = FlaxConvStack()
        self.head = nn.Dense(2)

    def __call__(self, x):
        h = self.features(x)  # [N, H, W, C]: the flatten is the caller's here, torch's Sequential's there
        return self.head(h.reshape(h.shape[0], -1))


def test_container_whose_outputs_cannot_be_the_same_thing_is_not_paired():
    # features holds exactly the conv on both sides, but torch's flattens inside it: [2, 100] vs
    # [2, 5, 5, 4] agree in no layout. Without it the row was a shape-mismatch FAIL.
    torch.manual_seed(0)
    r = parity.check(TorchFlattened(), FlaxFlattened(), _x(2, 3, 5, 5), dtype="float64")
    assert r.ok, str(r)
    row = r.layer("features")
    assert row.paired_by is None and row.isolated is None and row.accumulated is None, row


# -- b. an inner module that returns channels-first maps ----------------------------------------------
def test_inner_module_returning_channels_first_is_compared_in_that_layout():
    # HF FlaxResNetModel transposes its maps back to [N, C, H, W]: the "resnet" row was converted
    # as channels-first by the kind of its last layer, a shape-mismatch FAIL on a correct pair.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=4, hidden_sizes=[4], depths=[1],
                                    layer_type="basic", num_labels=3)
    torch.manual_seed(0)
    tm = transformers.ResNetForImageClassification(cfg).eval()
    fm = transformers.FlaxResNetForImageClassification(cfg, dtype=jnp.float64, _do_init=False).module
    r = parity.check(tm, fm, _x(2, 3, 8, 8), dtype="float64")  # resnet returns [2, 4, 2, 2]
    assert r.ok, str(r)
    row = r.layer("resnet")
    assert row.isolated is not None and row.isolated.ok and row.isolated.mismatches == 0, row


class TorchConvBody(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class TorchSquare(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = TorchConvBody()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x).amax(dim=(2, 3)))


class FlaxChannelsFirstBody(nn.Module):
    """Takes and returns [N, C, H, W], like an HF Flax vision module."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), padding=1, name="conv")(jnp.transpose(x, (0, 2, 3, 1))))
        return jnp.transpose(h, (0, 3, 1, 2))


class FlaxSquare(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(FlaxChannelsFirstBody(name="body")(x).max(axis=(2, 3)))


@pytest.mark.parametrize("spec", [{"body": "as_is"}, {"body:out": "as_is"}], ids=["layer", "layer-leaf"])
def test_output_layout_names_an_inner_row_by_layer_path(spec):
    # The body's [2, 4, 4, 4] maps fit both layouts, so the kind of the layer that made them decides (conv:
    # channels-last in Flax), wrongly here: only a declaration can say the body returns them
    # channels-first on the Flax side too, and output_layout= could name model outputs only.
    torch.manual_seed(0)
    r = parity.check(TorchSquare(), FlaxSquare(), _x(2, 3, 4, 4), dtype="float64", input_layout="as_is",
                     output_layout=spec)
    assert r.ok, str(r)
    row = r.layer("body")
    assert row.isolated is not None and row.isolated.ok and row.isolated.mismatches == 0, row


# -- c. work done inside the torch module and after the Flax one ------------------------------------
class TorchScaledEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * math.sqrt(self.embedding_dim)  # the scale inside the module


class TorchTokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = TorchScaledEmbedding(20, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.norm(self.embed(ids)))))


class OffDense(nn.Dense):
    """A planted bug: 1% off."""

    def __call__(self, x):
        return super().__call__(x) * 1.01


class FlaxTokens(nn.Module):
    planted: bool = False

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(20, 16, name="embed")(ids) * math.sqrt(16)  # the scale after the module
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(h)
        h = (OffDense if self.planted else nn.Dense)(16, name="fc")(h)
        return nn.Dense(4, name="head")(jnp.tanh(h))


def test_boundary_that_differs_is_not_blamed_and_hides_no_bug_further_down():
    # Without it, the embedding was the first divergence (isolated 0.75 = 1 - 1/sqrt(16)) on a
    # pair that agrees end to end, and a planted bug further down was hidden behind it.
    ids = torch.tensor([[1, 5, 7, 3], [2, 9, 11, 19]])
    torch.manual_seed(0)
    r = parity.check(TorchTokens(), FlaxTokens(), ids, dtype="float64")
    assert r.ok, str(r)
    row = r.layer("embed")
    assert row.boundary == "norm", row
    torch.manual_seed(0)
    r = parity.check(TorchTokens(), FlaxTokens(planted=True), ids, dtype="float64")
    assert not r.ok
    assert (r.first_divergence, r.divergence_kind) == ("fc", "forward"), r


def test_xglm_embedding_scale_is_a_boundary_not_a_divergence():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.XGLMConfig(vocab_size=50, d_model=16, num_layers=2, attention_heads=2, ffn_dim=32,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    tm = transformers.XGLMModel(cfg).eval()
    fm = transformers.FlaxXGLMModel(cfg, dtype=jnp.float32, _do_init=False).module
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = parity.Inputs(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.long),
                           position_ids=torch.arange(7)[None].expand(2, -1))
    # Forward only: torch's embedding zeroes the padding row's gradient, HF's Flax one does not
    # (a real difference of the pair, not of its rows). float32: XGLM builds its causal mask with
    # a float32 torch.full, which a float64 run overflows.
    r = parity.check(tm, fm, inputs, dtype="float32", grads=False)
    assert r.ok, str(r)
    assert r.layer("embed_tokens").boundary == "layers.0", r
    variables = weight_port.torch_to_flax(copy.deepcopy(tm), fm, inputs)
    flat = traverse_util.flatten_dict(variables["params"])
    flat[("layers", "1", "fc1", "kernel")] = flat[("layers", "1", "fc1", "kernel")] * 1.01
    bad = {**variables, "params": traverse_util.unflatten_dict(flat)}
    r = parity.check(tm, fm, inputs, dtype="float32", grads=False, variables=bad)
    assert not r.ok
    assert (r.first_divergence, r.divergence_kind) == ("layers.1.fc1", "forward"), r


# -- d. a parent that feeds its child the wrong tensor ----------------------------------------------
class TorchAttention(torch.nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x, bias):  # bias: additive float mask [N, 1, T], made by the caller
        w = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1]) + bias, dim=-1)
        return self.o(w @ self.v(x))


class TorchPreNormBlock(torch.nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.attn = TorchAttention(d)

    def forward(self, x, bias):
        return x + self.attn(self.ln(x), bias)


class TorchEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.blk = TorchPreNormBlock()
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x, mask):
        bias = (1.0 - mask[:, None, :].to(x.dtype)) * -1e4
        return self.out(self.blk(self.inp(x), bias))


class FlaxSelfAttention(nn.Module):
    """Takes the raw 0/1 mask (HF Flax style), so it cannot run alone on torch's float bias."""

    @nn.compact
    def __call__(self, x, mask):
        q, k, v = (nn.Dense(x.shape[-1], name=n)(x) for n in ("query", "key", "value"))
        scores = q @ jnp.swapaxes(k, 1, 2) / math.sqrt(x.shape[-1])
        w = jax.nn.softmax(jnp.where(mask[:, None, :] > 0, scores, scores - 1e4), axis=-1)
        return nn.Dense(x.shape[-1], name="out")(w @ v)


class FlaxPreNormBlock(nn.Module):
    miswired: bool = False

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
        return x + FlaxSelfAttention(name="attention")(x if self.miswired else h, mask)


class FlaxEncoder(nn.Module):
    miswired: bool = False

    @nn.compact
    def __call__(self, x, mask):
        h = FlaxPreNormBlock(self.miswired, name="block")(nn.Dense(8, name="embed")(x), mask)
        return nn.Dense(3, name="proj")(h)


def test_parent_that_feeds_its_child_the_wrong_tensor_is_blamed():
    # Without the input check, narrowing named blk.attn (its q fed x is off through the model, and
    # attn cannot run alone), though attn computes right on what it is given.
    x, mask = _x(2, 5, 4), np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    torch.manual_seed(0)
    good = parity.check(TorchEncoder(), FlaxEncoder(), (x, mask), dtype="float64", input_layout="as_is")
    assert good.ok, str(good)
    torch.manual_seed(0)
    r = parity.check(TorchEncoder(), FlaxEncoder(miswired=True), (x, mask), dtype="float64",
                     input_layout="as_is")
    assert not r.ok
    assert (r.first_divergence, r.divergence_kind) == ("blk", "forward"), r


# -- c, the other way: a real bug that the model hides is no boundary --------------------------------
def test_real_bug_hidden_downstream_is_not_taken_for_a_boundary():
    # A 1e-3 query weight through a near-uniform softmax: the next input (and the model output)
    # stays within float32 tolerance, as after a boundary that differs. Handed torch's query, the
    # Flax model's next input stays clean: the error is the layer's own, and the row is blamed.
    x, mask = _x(2, 5, 4), np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    torch.manual_seed(0)
    tm = TorchEncoder()
    with torch.no_grad():  # small scores: the softmax all but ignores the query
        for proj in (tm.blk.attn.q, tm.blk.attn.k):
            proj.weight.mul_(0.05)
            proj.bias.zero_()
    fm = FlaxEncoder()
    variables = weight_port.torch_to_flax(copy.deepcopy(tm), fm, (torch.as_tensor(x), torch.as_tensor(mask)),
                                          input_layout="as_is")
    flat = traverse_util.flatten_dict(variables["params"])
    key = ("block", "attention", "query", "kernel")
    flat[key] = flat[key] * 1.001
    r = parity.check(tm, fm, (x, mask), dtype="float32", input_layout="as_is",
                     variables={**variables, "params": traverse_util.unflatten_dict(flat)})
    assert r.outputs[0].ok  # the model output cannot see it
    assert r.layer("blk.attn.q").boundary is None, str(r)
    assert (r.first_divergence, r.divergence_kind) == ("blk.attn.q", "forward"), str(r)


# -- f. a layer returning a ModelOutput in torch and a dict in Flax -----------------------------------
@dataclass
class TwoOut(ModelOutput):
    # field order (z before a) differs from the Flax dict's sorted keys (a before z)
    z: torch.Tensor | None = None
    a: torch.Tensor | None = None


class TorchTwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.za = torch.nn.Linear(6, 5)
        self.zb = torch.nn.Linear(6, 3)

    def forward(self, x):
        return TwoOut(z=self.za(x), a=self.zb(x))


class TorchTwoHeadsModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = TorchTwoHeads()

    def forward(self, x):
        o = self.heads(x)
        return o.z.sum(-1) + o.a.sum(-1)


class FlaxTwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
        return {"z": nn.Dense(5, name="za")(x), "a": nn.Dense(3, name="zb")(x)}


class FlaxTwoHeadsModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        o = FlaxTwoHeads(name="heads")(x)
        return o["z"].sum(-1) + o["a"].sum(-1)


def test_a_layers_named_outputs_pair_by_name_across_modeloutput_and_dict():
    r = parity.check(TorchTwoHeadsModel(), FlaxTwoHeadsModel(), _x(4, 6), dtype="float64", input_layout="as_is")
    assert r.verdict == "PASS", str(r)
    # paired by name (out.z with out['z']), not by the order of the leaves: the row is compared
    row = next(x for x in r.layers if x.torch_path == "heads")
    assert row.isolated is not None and row.isolated.ok and not row.notes, str(r)


# -- g. a returned tensor the root also reads (BERT's last_hidden_state feeds its pooler) -------------
class TorchPooled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 4)
        self.pool = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)
        return h, torch.tanh(self.pool(h[:, 0]))


class FlaxPooled(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="body")(x)
        return h, jnp.tanh(nn.Dense(3, name="pool")(h[:, 0]))


def test_the_root_row_does_not_compare_its_seeded_output_cotangent():
    r = parity.check(TorchPooled(), FlaxPooled(), _x(2, 5, 6), dtype="float64", input_layout="as_is")
    assert r.verdict == "PASS", str(r)
    root = next(x for x in r.layers if x.torch_path == "")
    # torch's hook on h summed the pooler's use of it inside the root: a 'difference' of a
    # correct pair that Flax's output cotangent cannot show
    assert root.grad_accumulated is None, str(r)
    assert all(x.grad_accumulated is None or x.grad_accumulated.ok for x in r.layers), str(r)
