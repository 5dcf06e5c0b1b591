"""parity.lint: the static trap lint reads both graphs and names each trap with both locations.

Each twin here is wrong (or right) in exactly one known convention; the lint must say so before
any number is compared, and a check must carry its words as "trap:" warnings.
"""
from __future__ import annotations

import flax.linen as nn
import pytest
import torch
import torch.nn.functional as F

import parity
import parity.lint as lint_module
from parity.lint import LINT_ERROR, lint_pair
from parity.registry import PAIRS


class _TorchBlock(torch.nn.Module):
    """conv (stride 2, padding 1, kernel 3) -> nn.GELU() (exact) -> dropout -> inline tanh GELU."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act = torch.nn.GELU()
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        return F.gelu(self.drop(self.act(self.conv(x))), approximate="tanh")


class _TorchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TorchBlock()

    def forward(self, x):
        return self.block(x)


class _FlaxBlock(nn.Module):
    padding: str | tuple = ((1, 1), (1, 1))
    first_gelu_exact: bool = True
    second_gelu_exact: bool = False
    dropout_on: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=(2, 2), padding=self.padding, name="conv")(x)
        x = nn.gelu(x, approximate=not self.first_gelu_exact)
        x = nn.Dropout(0.1, deterministic=not self.dropout_on)(x)
        return nn.gelu(x, approximate=not self.second_gelu_exact)


class _FlaxModel(nn.Module):
    block: _FlaxBlock

    @nn.compact
    def __call__(self, x):
        return self.block(x)


def _twin(**kw) -> _FlaxModel:
    return _FlaxModel(block=_FlaxBlock(name="block", **kw))


def _lint(twin, size: int = 8):
    torch.manual_seed(0)
    return lint_pair(_TorchModel().eval(), twin, torch.randn(2, 3, size, size), input_layouts="NC...")


def _kinds(findings) -> list[str]:
    return [f.kind for f in findings]


def test_correct_twin_has_no_finding():
    assert _lint(_twin()) == []


def test_gelu_exact_vs_tanh_names_both_locations():
    # Flax's nn.gelu defaults to tanh; torch's nn.GELU() at block.act is exact (erf).
    found = [f for f in _lint(_twin(first_gelu_exact=False)) if f.kind == "gelu"]
    assert [(f.torch_where, f.flax_where) for f in found] == [("block.act", "block (inline gelu)")]
    assert "exact (erf)" in found[0].message and "tanh" in found[0].message


def test_inline_torch_gelu_is_located_to_its_module():
    # F.gelu(approximate="tanh") called in _TorchBlock.forward (torch.fx), Flax's is exact.
    found = [f for f in _lint(_twin(second_gelu_exact=True)) if f.kind == "gelu"]
    assert [(f.torch_where, f.flax_where) for f in found] == [("block (inline gelu)", "block (inline gelu)")]


class _Branchy(torch.nn.Module):
    """An exact F.gelu behind data-dependent Python control flow: torch.fx cannot trace this
    forward (a traced tensor cannot decide an ``if``); the lint reads a real forward instead."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        if h.abs().max() > 0:  # data-dependent: torch.fx raises TraceError here
            h = F.gelu(h)
        return h


class _BranchyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Branchy()

    def forward(self, x):
        return self.block(x)


class _FlaxBranchy(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.gelu(nn.Dense(6, name="fc")(x))  # flax's default: the tanh approximation


class _FlaxBranchyModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _FlaxBranchy(name="block")(x)


def test_inline_gelu_behind_data_dependent_control_flow_is_named():
    # Read from the forward itself, not a torch.fx trace (which cannot trace _Branchy).
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(_Branchy())
    torch.manual_seed(0)
    found = lint_pair(_BranchyModel().eval(), _FlaxBranchyModel(), torch.randn(3, 6), input_layouts="as_is")
    assert [(f.kind, f.torch_where, f.flax_where) for f in found] == [
        ("gelu", "block (inline gelu)", "block (inline gelu)")]
    assert "torch GELU is exact (erf), Flax gelu is tanh approximation" in found[0].message


class _Vmapped(torch.nn.Module):
    """Calls torch.vmap in its forward (Hugging Face builds attention masks so): a value read
    inside vmap raises, which once made the lint's forward fail and read nothing."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        return F.gelu(h) + torch.vmap(lambda row: row.sum() * 0.0)(h)[:, None]


class _FlaxVmapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="fc")(x)
        return nn.gelu(h) + (h.sum(-1) * 0.0)[:, None]  # tanh gelu: the finding the lint must make


def test_lint_reads_a_forward_that_calls_vmap():
    found = lint_pair(_Vmapped().eval(), _FlaxVmapped(), torch.randn(3, 6), input_layouts="as_is")
    assert [(f.kind, f.torch_where) for f in found] == [("gelu", "<root> (inline gelu)")], found


def test_lint_forward_leaves_the_module_as_it_found_it():
    # The lint runs one forward of the check's own (train-mode) module: BatchNorm statistics,
    # dropout's random draws, .grad fields and training flags are all put back.
    from parity.lint._torch import traced_ops

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5),
                            torch.nn.Linear(4, 4))
    m.train()
    m[0].weight.grad = torch.ones(4, 4)
    m[3].eval()  # a flag of its own, not the parent's
    x = torch.randn(8, 4) + 5
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    ops = traced_ops(m, (x,), train=True)
    assert {"linear", "batch_norm", "dropout"} <= {op.name for op in ops}
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(m[0].weight.grad, torch.ones(4, 4))
    assert [x.training for x in m] == [True, True, True, False]


def test_ops_are_credited_to_the_innermost_module_running():
    # The parent's own ops before and after a child runs are the parent's; hooks' ops are no one's.
    from parity.lint._torch import traced_ops

    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.child = _Branchy()

        def forward(self, x):
            return F.gelu(self.child(F.relu(x)), approximate="tanh")

    m = Parent()
    m.child.register_forward_hook(lambda mod, args, out: out.sum())
    ops = [(op.path, op.name) for op in traced_ops(m, (torch.randn(2, 6),), train=False)
           if op.name in ("relu", "gelu", "linear", "sum")]
    assert ops == [("", "relu"), ("child.fc", "linear"), ("child", "gelu"), ("", "gelu")]


def test_same_padding_with_stride_lists_the_sizes_where_it_differs():
    # 'SAME' with stride 2, kernel 3 pads (0, 1) at even sizes, torch pads (1, 1) everywhere.
    found = _lint(_twin(padding="SAME"))
    pads = [f for f in found if f.kind == "conv-padding"]
    assert [(f.torch_where, f.flax_where) for f in pads] == [("block.conv", "block/conv")] * 2  # H and W
    assert all("even input sizes (2, 4, 6, 8" in f.message and "this input (8) is one" in f.message
               for f in pads)
    # An odd input pads alike on both sides, yet the trap is still named (with the even sizes).
    odd = [f for f in _lint(_twin(padding="SAME"), size=7) if f.kind == "conv-padding"]
    assert len(odd) == 2 and all("even input sizes" in f.message and "this input" not in f.message
                                 for f in odd)


def test_conv_stride_mismatch_is_named():
    class Strided(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), name="conv")(x)
            return nn.gelu(nn.gelu(x, approximate=False), approximate=True)

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Strided(name="block")(x)

    found = [f for f in _lint(Twin()) if f.kind == "conv-geometry"]
    assert [(f.torch_where, f.flax_where) for f in found] == [("block.conv", "block/conv")]
    assert "stride: torch (2, 2), Flax (1, 1)" in found[0].message


def test_dropout_left_on_in_eval_is_named():
    found = [f for f in _lint(_twin(dropout_on=True)) if f.kind == "dropout-on"]
    assert [(f.torch_where, f.flax_where) for f in found] == [("block.drop", "block/Dropout_0")]


def test_pool_ceil_mode_is_named():
    class Pooled(torch.nn.Module):
        def __init__(self, ceil_mode):
            super().__init__()
            self.block, self.pool = _TorchBlock(), torch.nn.MaxPool2d(2, ceil_mode=ceil_mode)

        def forward(self, x):
            return self.pool(self.block(x))

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.max_pool(_FlaxBlock(name="block")(x), (2, 2), strides=(2, 2))

    x = torch.randn(2, 3, 10, 10)
    found = lint_pair(Pooled(True).eval(), Twin(), x, input_layouts="NC...")
    assert [(f.kind, f.torch_where) for f in found] == [("pool-ceil", "pool")]
    assert lint_pair(Pooled(False).eval(), Twin(), x, input_layouts="NC...") == []


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_registry_pair_has_no_finding(name):
    pair = PAIRS[name]
    config = pair.config("tiny")
    torch_model, flax_model = pair.build(config)
    x = pair.example_input(config, batch=2, seed=0)
    assert lint_pair(torch_model.eval(), flax_model, x, input_layouts=pair.input_layout) == []


def test_check_warns_and_strict_fails():
    # A 'SAME' twin on an odd input computes the same numbers (PASS), but the trap is named,
    # and strict=True turns it into a FAIL.
    torch.manual_seed(0)
    tm, x = _TorchModel(), torch.randn(2, 3, 7, 7)
    kw = dict(input_layout="NC...", layers=False, grads=False)
    report = parity.check(tm, _twin(padding="SAME"), x, **kw)
    assert report.verdict == "PASS"
    assert any(w.startswith("trap: conv-padding at torch block.conv / Flax block/conv") for w in report.warnings)
    strict = parity.check(tm, _twin(padding="SAME"), x, strict=True, **kw)
    assert strict.verdict == "FAIL" and strict.strict_findings
    assert "strict: " in str(strict)
    assert parity.check(tm, _twin(), x, strict=True, **kw).verdict == "PASS"


def test_lint_crash_is_a_finding_not_an_exception(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(lint_module, "_flax_eqns", boom)
    torch.manual_seed(0)
    report = parity.check(_TorchModel(), _twin(), torch.randn(2, 3, 8, 8), input_layout="NC...",
                          layers=False, grads=False)
    assert report.verdict == "PASS"
    assert any(w.startswith(f"trap: {LINT_ERROR}") and "RuntimeError: planted" in w for w in report.warnings)


# --- the CLI: warnings printed by default, --strict exits 1 (factories loaded by `parity check`) ----
def make_torch_model() -> _TorchModel:
    return _TorchModel()


def make_flax_same() -> _FlaxModel:
    return _twin(padding="SAME")


def _parity_check(*args: str):
    from pathlib import Path

    from child_process import cli_in_process

    return cli_in_process("check", "--torch", "test_lint:make_torch_model", "--flax", "test_lint:make_flax_same",
                          "--input-shape", "2,3,7,7", "--layout", "NC...", "--no-layers", "--no-grads", "--quiet",
                          *args, cwd=Path(__file__).parent)


def test_cli_prints_traps_and_strict_exits_1():
    plain = _parity_check()
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "trap: conv-padding at torch block.conv / Flax block/conv" in plain.stdout
    strict = _parity_check("--strict")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "strict: 2 trap finding(s)" in strict.stdout
