"""Per-layer rows on patterns found in Hugging Face pairs, each as a tiny hand-written pair:
a layer called twice with shared weights (ALBERT), a layer handed other indices on each side
(BART's position embedding), a layer returning an optional output only Flax fills (attention
weights), a bug inside a layer that cannot run alone (Mistral's mask), a frozen torch parameter
(RoFormer's sinusoid table)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import parity


def _x(*shape):
    return np.random.default_rng(0).standard_normal(shape)


# -- a layer called twice (ALBERT's shared layer) ------------------------------------------------
class TorchShared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


class FlaxShared(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.Dense(4, name="layer")
        return layer(jnp.tanh(layer(x)))


def test_shared_layer_parameter_gradient_is_the_sum_over_its_calls():
    # Without the sum, the first call's share of the weight gradient was compared with torch's
    # total: a correct twin FAILed backward at "layer".
    torch.manual_seed(0)
    r = parity.check(TorchShared(), FlaxShared(), _x(2, 4), dtype="float64")
    assert r.ok, r
    rows = [row for row in r.layers if row.torch_path == "layer"]
    assert len(rows) == 2 and rows[0].grad_isolated is not None, r


# -- a layer handed other integer inputs on each side (BartLearnedPositionalEmbedding) -------------
class TorchPositions(torch.nn.Embedding):
    def forward(self, ids):  # takes token ids, embeds their positions
        return super().forward(torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1) + 2)


class TorchPosNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(20, 4)
        self.pos = TorchPositions(12, 4)

    def forward(self, ids):
        return self.tok(ids) + self.pos(ids)


class FlaxPosNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None] + 2, ids.shape)
        return nn.Embed(20, 4, name="tok")(ids) + nn.Embed(12, 4, name="pos")(positions)


def test_layer_given_other_indices_is_not_run_alone_and_not_blamed():
    # Without the check, Flax's position embedding ran on torch's token ids: a false FAIL at "pos".
    torch.manual_seed(0)
    ids = torch.tensor([[5, 11, 17, 3], [9, 1, 2, 19]])
    r = parity.check(TorchPosNet(), FlaxPosNet(), ids, dtype="float64")
    assert r.ok, r
    row = r.layer("pos")
    assert row.isolated is None and any("integer values differ" in n for n in row.notes), row
    assert row.accumulated is not None and row.accumulated.ok


# -- an optional output torch returns as None, Flax as an array ------------------------------------
class TorchAttn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x), None  # attention weights only on request


class TorchWithAttn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = TorchAttn()

    def forward(self, x):
        return self.attn(x)[0]


class FlaxAttn(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="proj")(x)
        return h, jnp.ones((x.shape[0], 2))  # always returned


class FlaxWithAttn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return FlaxAttn(name="attn")(x)[0]


def test_extra_flax_layer_output_is_not_a_failure():
    # Without it, the attn row compared {out[0], out[1]} with {out[0]}: a false FAIL (rel inf).
    torch.manual_seed(0)
    r = parity.check(TorchWithAttn(), FlaxWithAttn(), _x(2, 3, 4), dtype="float64")
    assert r.ok, r
    row = r.layer("attn")
    assert row.isolated is not None and row.isolated.ok and row.isolated.mismatches == 0, row


# -- a bug inside a layer that cannot run alone -----------------------------------------------------
class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x, bias):  # torch hands the block a second tensor Flax's does not take
        return self.b(torch.tanh(self.a(x)) + bias)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = torch.nn.Linear(4, 4)
        self.block = TorchBlock()
        self.post = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.post(self.block(self.pre(x), torch.zeros(())))


class FlaxBlock(nn.Module):
    wrong: bool = False

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4, name="a")(x))
        return nn.Dense(4, name="b")(h * 1.01 if self.wrong else h)


class FlaxNet(nn.Module):
    wrong: bool = False

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="post")(FlaxBlock(self.wrong, name="block")(nn.Dense(4, name="pre")(x)))


def test_bug_inside_a_layer_that_cannot_run_alone_is_located_there():
    # Without the narrowing, the first divergence was "<root>" (the only layer around the bug that
    # runs alone); the accumulated rows say the error starts inside "block".
    torch.manual_seed(0)
    good = parity.check(TorchNet(), FlaxNet(), _x(2, 4), dtype="float64")
    assert good.ok, good
    assert good.layer("block").isolated is None  # cannot run alone: its inputs differ
    r = parity.check(TorchNet(), FlaxNet(wrong=True), _x(2, 4), dtype="float64")
    assert not r.ok
    assert (r.first_divergence, r.divergence_kind) == ("block", "forward"), r
    assert "cannot run alone" in str(r)


# -- a frozen torch parameter ---------------------------------------------------------------------
class TorchFrozen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.table = torch.nn.Parameter(torch.linspace(0, 1, 4), requires_grad=False)

    def forward(self, x):
        return self.fc(x) * self.table


class FlaxFrozen(nn.Module):
    @nn.compact
    def __call__(self, x):
        table = self.param("table", nn.initializers.zeros, (4,))
        return nn.Dense(4, name="fc")(x) * table


def test_frozen_torch_parameter_gradient_is_not_compared():
    # Without it, torch's "no gradient" (zeros) met Flax's real one: a false FAIL at grad table.
    torch.manual_seed(0)
    r = parity.check(TorchFrozen(), FlaxFrozen(), _x(2, 4), dtype="float64")
    assert r.ok, r
    names = [c.name for c in r.param_grads]
    assert "grad table" not in names and "grad fc.weight" in names


# -- an additive attention mask of finfo.min fed to a layer that runs alone -------------------------
class TorchMasked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, mask):
        return torch.softmax(self.fc(x) + mask, dim=-1)


class TorchMaskNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = TorchMasked()

    def forward(self, x, mask):
        return self.attn(x, mask)


class FlaxMasked(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return jax.nn.softmax(nn.Dense(4, name="fc")(x) * 1.001 + mask, axis=-1)  # planted: * 1.001


class FlaxMaskNet(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return FlaxMasked(name="attn")(x, mask)


def test_layer_fed_a_finfo_min_mask_is_still_judged():
    # HF builds additive masks from finfo(dtype).min: the layer's input norm overflowed to inf in
    # float64 and its noise floor with it, so the planted bug passed its row (located at <root>).
    torch.manual_seed(0)
    mask = np.zeros((2, 3, 4))
    mask[1, :, 2:] = np.finfo(np.float64).min
    r = parity.check(TorchMaskNet(), FlaxMaskNet(), (_x(2, 3, 4), mask), dtype="float64",
                     input_layout="as_is")
    assert not r.ok
    assert (r.first_divergence, r.divergence_kind) == ("attn", "forward"), r
