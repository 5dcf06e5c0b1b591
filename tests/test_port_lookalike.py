"""Look-alike layers: a Flax module of its own class (an independent port's copy of BatchNorm,
Dense, LayerNorm, Embed) whose variables are exactly a known kind's is ported by that kind's rule
with a note; one of no known kind gets an error naming both classes and the register_rule call
that fixes it; "closest" keys in key errors come from the same layer kind."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import weight_port as wp
from parity.judge import judge
from parity.tolerances import FORWARD, tolerance_for
from weight_port import rules

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
IDS = torch.tensor([[1, 4, 2], [0, 3, 3]])


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)
        with torch.no_grad():  # non-trivial statistics, so the batch_stats port is checked
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.bn2(self.conv2(x)).mean((2, 3)))


class BatchNorm(nn.Module):
    """An independent port's own BatchNorm (eval mode): Flax's variable names, or others."""

    names: tuple[str, str, str, str] = ("scale", "bias", "mean", "var")

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param(self.names[0], nn.initializers.ones, (c,))
        bias = self.param(self.names[1], nn.initializers.zeros, (c,))
        mean = self.variable("batch_stats", self.names[2], jnp.zeros, (c,)).value
        var = self.variable("batch_stats", self.names[3], jnp.ones, (c,)).value
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias


class FlaxBlock(nn.Module):
    """Auto-named: pairs by structure and execution order (BatchNorm_0 is not flax's BatchNorm)."""

    names: tuple[str, str, str, str] = ("scale", "bias", "mean", "var")

    @nn.compact
    def __call__(self, x):
        x = nn.relu(BatchNorm(self.names)(nn.Conv(4, (3, 3), padding=1, use_bias=False)(x)))
        x = BatchNorm(self.names)(nn.Conv(4, (3, 3), padding=1, use_bias=False)(x))
        return nn.Dense(5)(x.mean((1, 2)))


def _close(variables, flax_model, torch_model, x, flax_x, layout=wp.AS_IS) -> None:
    with torch.no_grad():
        ref = torch_model(x).numpy()
    c = judge("out", np.asarray(flax_model.apply(variables, flax_x)), ref, tolerance_for("float32", FORWARD),
                layout=layout)
    assert c.ok, str(c)


def test_batch_norm_copy_ported_by_its_kinds_rule_with_a_note():
    t = TorchBlock().eval()
    plan = wp.build_plan(t, FlaxBlock(), X)
    assert [n.split(" is of")[0] for n in plan.notes] == ["flax BatchNorm_0 (BatchNorm)",
                                                          "flax BatchNorm_1 (BatchNorm)"]
    assert all("exactly a BatchNorm's variables" in n and "batch_norm rule" in n for n in plan.notes)
    assert "torch bn1 (BatchNorm2d)" in plan.notes[0] and plan.notes[0] in str(plan)
    variables = plan.to_flax(t.state_dict())
    _close(variables, FlaxBlock(), t, X, X.numpy().transpose(0, 2, 3, 1))
    back = wp.flax_to_torch(variables, t, plan=plan)
    assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())


class Dense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return x @ k + self.param("bias", nn.initializers.zeros, (self.features,))


class LayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        y = (x - mean) / jnp.sqrt(var + 1e-5)
        return y * self.param("scale", nn.initializers.ones, (x.shape[-1],)) + self.param(
            "bias", nn.initializers.zeros, (x.shape[-1],))


class Embed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return self.param("embedding", nn.initializers.normal(), (7, 6))[ids]


class TorchTokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, ids):
        return self.out(self.norm(self.embed(ids)))


class FlaxTokens(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return Dense(3, name="out")(LayerNorm(name="norm")(Embed(name="embed")(ids)))


@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_dense_layer_norm_embed_copies_paired_by_name(source):
    """With a torch module its layer types decide; from a bare state_dict the Flax copies' variables do."""
    t = TorchTokens()
    plan = (wp.build_plan(t, FlaxTokens(), IDS) if source == "module"
            else wp.build_plan(None, FlaxTokens(), IDS, state=t.state_dict()))
    assert {n.split(" (")[0]: n for n in plan.notes}.keys() == {"flax embed", "flax norm", "flax out"}
    assert {layer.info.torch_path: layer.rule.name for layer in plan.layers} == {
        "embed": "embedding", "norm": "norm", "out": "linear"}
    variables = plan.to_flax(t.state_dict())
    _close(variables, FlaxTokens(), t, IDS, IDS.numpy())


class Conv(nn.Module):
    """A Conv copy with a square kernel: from variables alone it could as well be a Dense."""

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], 4))
        return nn.Conv(4, (3, 3), padding=1, use_bias=False).apply({"params": {"kernel": k}}, x)


class TorchConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x)


class FlaxConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Conv(name="conv")(x)


def test_two_kinds_converting_differently_refused_without_torch_module():
    t = TorchConv()
    with pytest.raises(wp.NoRuleError, match="conv .flax Conv: has the variables of a Dense and of a Conv"):
        wp.torch_to_flax(t.state_dict(), FlaxConv(), X)
    variables = wp.torch_to_flax(t, FlaxConv(), X)  # the torch layer type decides
    _close(variables, FlaxConv(), t, X, X.numpy().transpose(0, 2, 3, 1), wp.CHANNELS_FIRST)


def test_class_of_no_known_kind_error_names_classes_and_register_rule_call(monkeypatch):
    t = TorchBlock().eval()
    twin = FlaxBlock(("gamma", "beta", "avg", "v"))
    with pytest.raises(wp.KeyMismatchError) as err:
        wp.torch_to_flax(t, twin, X)
    call = ("weight_port.register_rule(BatchNorm, weight_port.rules.renamed(weight_port.rules.BATCH_NORM, "
            "{'weight': 'gamma', 'bias': 'beta', 'running_mean': 'avg', 'running_var': 'v'}))")
    assert "torch bn1 (BatchNorm2d) found no Flax module of its kind" in err.value.hint
    assert "flax BatchNorm_0 (BatchNorm, and 1 more of that class)" in err.value.hint
    assert err.value.hint.endswith(call) and call in str(err.value)
    # the call it names fixes the port (registered for this test only)
    monkeypatch.setitem(rules._flax_rules(), BatchNorm, rules.renamed(
        rules.BATCH_NORM, {"weight": "gamma", "bias": "beta", "running_mean": "avg", "running_var": "v"}))
    variables = wp.torch_to_flax(t, twin, X)
    _close(variables, twin, t, X, X.numpy().transpose(0, 2, 3, 1))
    back = wp.flax_to_torch(variables, t, twin, X)
    assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())


def test_renamed_refuses_a_tensor_the_rule_does_not_have():
    with pytest.raises(ValueError, match=r"\['gamma'\] are not tensors of the batch_norm rule"):
        rules.renamed(rules.BATCH_NORM, {"gamma": "weight"})


class TorchHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.body(x))


class FlaxHeadBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.BatchNorm(use_running_average=True, name="head_bn")(nn.Dense(4, name="body")(x))
        return nn.Dense(6, name="classifier")(y)


def test_closest_keys_come_from_the_same_layer_kind():
    """head.weight reads closer to head_bn's variables, but a Linear's closest is a Dense's."""
    with pytest.raises(wp.KeyMismatchError) as err:
        wp.torch_to_flax(TorchHead(), FlaxHeadBN(), torch.randn(2, 3))
    lines = {ln.split(" (")[0]: ln for ln in err.value.unexpected + err.value.missing}
    assert "head_bn" not in lines["torch head.weight -> flax params/head/kernel"]  # once: head_bn.mean
    assert "closest unused torch key: head.bias" in lines["flax params/classifier/bias"]
    assert "closest" not in lines["flax params/head_bn/scale"]  # no Linear key is a BatchNorm's
