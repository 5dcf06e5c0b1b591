"""Name mapping (rules, Sequential, auto-names, rename), key errors with closest candidates,
direct parameters, missing rules and the extension hook, and hyperparameter checks."""
from __future__ import annotations

import flax.linen as nn
import numpy as np
import pytest
import torch

import weight_port as wp
from parity.judge import judge
from parity.tolerances import FORWARD, tolerance_for
from weight_port.matching import candidate_paths
from weight_port.plan import build_plan

X = torch.randn(2, 3, 4, 4)


def _np(v) -> np.ndarray:
    return np.asarray(v)


def _assert_forward_close(flax_out, torch_out) -> None:
    """float32 forward parity through the one comparison helper and tolerance table."""
    c = judge("output", np.asarray(flax_out), torch_out.detach().numpy(),
                tolerance_for("float32", FORWARD), layout=wp.AS_IS)
    assert c.ok, str(c)


def test_candidate_paths():
    assert candidate_paths("down.0.conv1") == [("down_0", "conv1"), ("down", "0", "conv1"),
                                               ("down", "layers_0", "conv1")]
    assert candidate_paths("net.1", sequential={"net"})[:3] == [("net_1",), ("net", "1"), ("net", "layers_1")]
    assert candidate_paths("0", sequential={""}) == [("0",), ("layers_0",)]
    assert candidate_paths("a/b_3/c") == [("a", "b_3", "c")]  # a rename to a literal Flax path
    assert candidate_paths("") == [()]


class TorchBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3) for _ in range(2)])
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.net(x)


def _shapes(tree) -> dict:
    from flax import traverse_util

    return {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree).items()}


def test_index_paths_and_sequential_layers():
    """blocks.0 -> blocks/0 (modules named by index) and net.2 -> net/layers_2 (nn.Sequential)."""
    t = TorchBlocks()
    variables = {"params": {
        "blocks": {str(i): {"kernel": np.zeros((3, 3)), "bias": np.zeros(3)} for i in range(2)},
        "net": {"layers_0": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)},
                "layers_2": {"kernel": np.zeros((4, 2)), "bias": np.zeros(2)}},
    }}
    plan = build_plan(t, variables=variables)
    out = plan.to_flax(t.state_dict())
    assert _shapes(out) == _shapes(variables)
    np.testing.assert_array_equal(_np(out["params"]["net"]["layers_2"]["kernel"]), t.net[2].weight.detach().numpy().T)
    sd = wp.flax_to_torch(out, t)
    assert all(torch.equal(sd[k], v) for k, v in t.state_dict().items())


class FlaxSequentialTwin(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.Dense(3, name=f"blocks_{i}")(x)
        return nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)], name="net")(x)


def test_flax_sequential_twin():
    t = TorchBlocks()
    x = torch.randn(2, 3)
    v = wp.torch_to_flax(t, FlaxSequentialTwin(), x, input_layout=wp.AS_IS)
    y = FlaxSequentialTwin().apply(v, x.numpy())
    _assert_forward_close(y, t(x))


class TorchAuto(torch.nn.Module):
    """Registration order differs from the twin's creation order (norm before fc)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.LayerNorm(5)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.norm(self.fc(torch.flatten(self.conv(x), 1))))


class FlaxAuto(nn.Module):
    """Flax auto-names: Conv_0, Dense_0, LayerNorm_0, Dense_1."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding=1)(x)
        x = nn.Dense(5)(x.reshape(x.shape[0], -1))
        return nn.Dense(2)(nn.LayerNorm(epsilon=self.eps)(x))


def test_auto_names_matched_structurally():
    t = TorchAuto()
    plan = build_plan(t, FlaxAuto(), X)
    paths = {layer.info.torch_path: "/".join(layer.info.flax_path) for layer in plan.layers}
    assert paths == {"conv": "Conv_0", "norm": "LayerNorm_0", "fc": "Dense_0", "head": "Dense_1"}
    assert plan.layers[2].info.flatten == (4, 4, 4)
    v = wp.torch_to_flax(t, FlaxAuto(), X)
    y = FlaxAuto().apply(v, X.numpy().transpose(0, 2, 3, 1))
    _assert_forward_close(y, t(X))
    sd = wp.flax_to_torch(v, t, FlaxAuto(), X)
    assert all(torch.equal(sd[k], v_) for k, v_ in t.state_dict().items())


def test_rename_callable_and_regex_pairs():
    t = TorchAuto()
    pairs = [(r"^conv$", "Conv_0"), (r"^norm$", "LayerNorm_0"), (r"^fc$", "Dense_0"), (r"^head$", "Dense_1")]
    v1 = wp.torch_to_flax(t, FlaxAuto(), X, rename=pairs)
    table = {a.strip("^$"): b for a, b in pairs}
    v2 = wp.torch_to_flax(t, FlaxAuto(), X, rename=lambda p: table.get(p, p))
    for a, b in zip(*(sorted(_shapes(v).items()) for v in (v1, v2))):
        assert a == b
    # a rename wins over structural matching: swapping the two Dense targets is a shape error
    with pytest.raises(wp.KeyMismatchError):
        wp.torch_to_flax(t, FlaxAuto(), X, rename=[(r"^fc$", "Dense_1"), (r"^head$", "Dense_0")])


class FlaxMisnamed(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = nn.Dense(5, name="fcc")(x.reshape(x.shape[0], -1))
        x = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
        return nn.Dense(3, name="head")(x)  # 3 outputs where torch has 2


def test_one_error_lists_missing_unexpected_mismatched_with_closest():
    with pytest.raises(wp.KeyMismatchError) as info:
        wp.torch_to_flax(TorchAuto(), FlaxMisnamed(), X)
    err, msg = info.value, str(info.value)
    # fc's tensors are claimed structurally by the only unclaimed Dense (fcc) -- by type and shape
    assert not any("fc." in m for m in err.unexpected), msg
    assert any("head.weight" in m and "(3, 5)" in m or "head.weight" in m for m in err.mismatched), msg
    assert len(err.mismatched) == 2, msg  # head kernel and bias


class FlaxTypo(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))
        x = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
        x = nn.Dense(2, name="head")(x)
        return x + self.param("extra", nn.initializers.zeros, (2,))


def test_missing_key_names_closest_candidate():
    t = TorchAuto()
    state = {k: v for k, v in t.state_dict().items() if k != "head.bias"}
    state["head.bais"] = t.head.bias.detach()
    plan = build_plan(t, FlaxTypo(), X)
    with pytest.raises(wp.KeyMismatchError) as info:
        plan.to_flax(state)
    err = info.value
    assert any("head.bias" in m for m in err.missing)
    assert any(m.startswith("flax params/extra") for m in err.missing)
    assert any("head.bais" in u and "closest wanted key: head.bias" in u for u in err.unexpected), str(err)
    assert any(m.startswith("torch head.bias") and "closest unused torch key: head.bais" in m for m in err.missing)


class TorchTokens(torch.nn.Module):
    def __init__(self, n: int = 1):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, n, 4))
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x) + self.cls_token.sum()


class FlaxTokens(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="proj")(x) + self.param("cls_token", nn.initializers.zeros, (1, 1, 4)).sum()


def test_direct_parameters():
    x = torch.randn(2, 4)
    t = TorchTokens()
    v = wp.torch_to_flax(t, FlaxTokens(), x, input_layout=wp.AS_IS)
    np.testing.assert_array_equal(_np(v["params"]["cls_token"]), t.cls_token.detach().numpy())
    with pytest.raises(wp.ShapeMismatchError, match="cls_token"):
        wp.torch_to_flax(TorchTokens(n=2), FlaxTokens(), x, input_layout=wp.AS_IS)


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.gamma


class TorchCustom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = Scale()

    def forward(self, x):
        return self.scale(x)


class FlaxCustom(nn.Module):
    @nn.compact
    def __call__(self, x):
        return ScaleFlax(name="scale")(x)


class ScaleFlax(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("g", nn.initializers.ones, (x.shape[-1],))


def test_unknown_layer_names_type_and_hook_then_register_rule():
    x = torch.randn(2, 4)
    with pytest.raises(wp.NoRuleError, match=r"scale \(Scale\).*register_rule"):
        wp.torch_to_flax(TorchCustom(), FlaxCustom(), x, input_layout=wp.AS_IS)
    wp.register_rule(Scale, wp.Rule((wp.TensorMap("gamma", "params", "g"),)))
    t = TorchCustom()
    v = wp.torch_to_flax(t, FlaxCustom(), x, input_layout=wp.AS_IS)
    np.testing.assert_array_equal(_np(v["params"]["scale"]["g"]), t.scale.gamma.detach().numpy())


class TorchNorms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(4)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.ln = torch.nn.LayerNorm(4, elementwise_affine=False)

    def forward(self, x):
        return self.ln(self.gn(self.bn(x)).permute(0, 2, 3, 1))


class FlaxNorms(nn.Module):
    bn_momentum: float = 0.9
    groups: int = 2
    ln_eps: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5, name="bn")(x)
        x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, name="gn")(x)
        return nn.LayerNorm(epsilon=self.ln_eps, use_scale=False, use_bias=False, name="ln")(x)


def test_hyperparameters_checked_by_name():
    x = torch.randn(2, 4, 3, 3)
    wp.torch_to_flax(TorchNorms(), FlaxNorms(), x)  # all agree
    with pytest.raises(wp.AttributeMismatchError) as info:
        wp.torch_to_flax(TorchNorms(), FlaxNorms(bn_momentum=0.99, groups=4, ln_eps=1e-6), x)
    msg = str(info.value)
    assert "bn: torch momentum=0.1 is flax momentum=0.9" in msg
    assert "gn: torch num_groups=2" in msg
    assert "ln: torch eps=1e-05" in msg  # a parameter-free LayerNorm is still checked
    with pytest.warns(UserWarning, match="attribute mismatch"):
        wp.torch_to_flax(TorchNorms(), FlaxNorms(ln_eps=1e-6), x, check_attributes="warn")
    wp.torch_to_flax(TorchNorms(), FlaxNorms(ln_eps=1e-6), x, check_attributes="ignore")


# -- names decide first: a walk of the Flax tree, one form per list index ---------------------------
def test_tree_paths_pick_a_form_per_index():
    """HF ResNet: ``stages.0`` is ``stages/0`` but ``layer.0`` is ``layer/layer_0`` in one path."""
    from weight_port.matching import tree_paths

    leaves = [("a", "stages", "0", "layer", "layer_0", "conv"), ("a", "stages", "0", "layer", "layer_1", "conv"),
              ("blocks_1", "fc"), ("seq", "layers_2", "fc")]
    prefixes = {leaf[:i] for leaf in leaves for i in range(1, len(leaf) + 1)}
    assert tree_paths("a.stages.0.layer.1.conv", prefixes) == [("a", "stages", "0", "layer", "layer_1", "conv")]
    assert tree_paths("blocks.1.fc", prefixes) == [("blocks_1", "fc")]
    assert tree_paths("seq.2.fc", prefixes) == [("seq", "layers_2", "fc")]
    assert tree_paths("a.stages.1.layer.0.conv", prefixes) == []  # no such Flax module: no guess


class _HFStyleTorch(torch.nn.Module):
    """Two same-shaped convs at ``stage.0.layer.0`` / ``.1``: only names tell them apart."""

    def __init__(self):
        super().__init__()
        block = torch.nn.Module()
        block.layer = torch.nn.ModuleList([torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)])
        self.stage = torch.nn.ModuleList([block])

    def forward(self, x):
        for conv in self.stage[0].layer:
            x = conv(x)
        return x


class _HFStyleLayer(nn.Module):
    """HF's Flax collections: a module ``layer`` holding ``layer_0``, ``layer_1``."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.Conv(3, (3, 3), padding=1, name=f"layer_{i}")(x)
        return x


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _HFStyleLayer(name="layer")(x)


class _Stage(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Block(name="0")(x)


class _HFStyleFlax(nn.Module):
    """Flax paths ``stage/0/layer/layer_i``: the index of ``stage`` a component of its own, the
    index of ``layer`` an HF-style ``layer_i`` inside ``layer``."""

    @nn.compact
    def __call__(self, x):
        return _Stage(name="stage")(x)


def test_flax_to_torch_from_variables_alone_pairs_by_names():
    """No Flax module, no example input: structure alone is ambiguous (both convs fit both), the
    names ``stage/0/layer/layer_1`` decide; once an AmbiguousPairingError."""
    t = _HFStyleTorch()
    with torch.no_grad():
        t.stage[0].layer[1].weight.mul_(2)  # the two convs differ
    plan = build_plan(t, _HFStyleFlax(), X)
    variables = plan.to_flax(t.state_dict())
    assert set(variables["params"]["stage"]["0"]["layer"]) == {"layer_0", "layer_1"}
    back = wp.flax_to_torch(variables, _HFStyleTorch())
    assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())
    assert plan.pairing_notes == []  # with the Flax module too: by name, not by execution order
