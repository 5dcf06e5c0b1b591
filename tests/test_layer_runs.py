"""The per-layer analysis compiles one program per kind of layer met more than once
(parity._layer_runs): equal layers share it, and a layer that differs in any field never does."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import torch

import parity
import parity._layer_runs as runs
from parity._layer_runs import same_static


class TorchBlock(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x):
        return x + torch.nn.functional.gelu(self.fc(self.norm(x)))


class TorchStack(torch.nn.Module):
    def __init__(self, d: int = 8, n: int = 4):
        super().__init__()
        self.blocks = torch.nn.ModuleList([TorchBlock(d) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Block(nn.Module):
    d: int
    approximate: bool = False

    def setup(self):
        self.norm = nn.LayerNorm(epsilon=1e-5)
        # a fresh initializer closure per block, as HF's Flax modules build them
        self.fc = nn.Dense(self.d, kernel_init=nn.initializers.normal(0.02))

    def __call__(self, x):
        return x + nn.gelu(self.fc(self.norm(x)), approximate=self.approximate)


class Stack(nn.Module):
    d: int = 8
    n: int = 4
    tanh_at: int = -1  # the block that computes GELU by its tanh approximation (a planted mis-port)

    def setup(self):
        self.blocks = [Block(self.d, approximate=i == self.tanh_at) for i in range(self.n)]

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _check(flax_module, monkeypatch=None, groups=None):
    if groups is not None:
        real = runs.shared_programs

        def spy(jobs):
            out = real(jobs)
            groups.update({j.row.torch_path: out.get(id(j)) for j in jobs})
            return out
        monkeypatch.setattr(runs, "shared_programs", spy)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    return parity.check(TorchStack(), flax_module, x, dtype="float64", input_layout="as_is", lint=False)


def test_equal_layers_share_one_program_and_a_differing_one_is_caught(monkeypatch):
    groups: dict = {}
    r = _check(Stack(tanh_at=2), monkeypatch, groups)
    # blocks 0, 1 and 3 are one kind (their initializer closures differ by identity only) ...
    shared = {groups[f"blocks.{i}"] for i in (0, 1, 3)}
    assert len(shared) == 1 and None not in shared, groups
    # ... block 2, whose one field differs, runs its own program and is the one blamed
    assert groups["blocks.2"] not in shared
    assert all(groups[f"blocks.{i}.fc"] is groups["blocks.0.fc"] is not None for i in range(4))
    assert r.verdict == "FAIL"
    assert (r.first_divergence, r.divergence_kind) == ("blocks.2", "forward"), r.summary()
    assert not r.layer("blocks.2").isolated.ok
    assert all(r.layer(f"blocks.{i}").isolated.ok for i in (0, 1, 3))


def test_sharing_changes_no_verdict(monkeypatch):
    shared = _check(Stack())
    monkeypatch.setattr(runs, "shared_programs", lambda jobs: {})
    alone = _check(Stack())
    assert shared.verdict == alone.verdict == "PASS"
    for a, b in zip(shared.layers, alone.layers):
        assert a.name == b.name and a.ok == b.ok
        for ca, cb in ((a.isolated, b.isolated), (a.grad_isolated, b.grad_isolated)):
            assert (ca is None) == (cb is None)
            if ca is not None:  # one program or a batched one: the same float64 arithmetic, to rounding
                np.testing.assert_allclose(ca.max_abs, cb.max_abs, rtol=0, atol=1e-12)


def test_same_static_compares_what_a_program_computes():
    init = nn.initializers.normal
    assert same_static(nn.Dense(4, kernel_init=init(0.02), name="a"), nn.Dense(4, kernel_init=init(0.02), name="b"))
    assert not same_static(nn.Dense(4, kernel_init=init(0.02)), nn.Dense(4, kernel_init=init(0.03)))
    assert not same_static(nn.Dense(4), nn.Dense(5))
    assert not same_static(nn.Dense(4, precision="highest"), nn.Dense(4))
    assert not same_static(Block(4), Block(4, approximate=True))
    assert same_static(Block(4), Block(4))
    assert not same_static(lambda x: x + 1, lambda x: x + 2)  # other code

    def scale(k):
        return lambda x: x * k
    assert same_static(scale(1.0), scale(1.0)) and not same_static(scale(1.0), scale(2.0))  # closed-over values
    assert not same_static(np.zeros(3), np.ones(3))
    assert same_static(jax.numpy.ones(3), jax.numpy.ones(3))

    class Ambiguous:
        def __eq__(self, other):
            return np.array([True, False])
    assert not same_static(Ambiguous(), Ambiguous())


def test_a_chunks_layers_are_all_dispatched_before_the_first_is_waited_for(monkeypatch):
    # XLA runs a dispatched program asynchronously: the rows judge one layer while the next ones
    # compute, so every program of a chunk is dispatched before the first result is fetched
    events: list[str] = []
    real_shared, real_host = runs.shared_programs, runs.to_host

    def spy_shared(jobs):
        def traced(fn):
            def call(*a):
                events.append("dispatch")
                return fn(*a)
            return call
        return {k: traced(fn) for k, fn in real_shared(jobs).items()}

    def spy_host(tree):
        events.append("wait")
        return real_host(tree)
    monkeypatch.setattr(runs, "shared_programs", spy_shared)
    monkeypatch.setattr(runs, "to_host", spy_host)
    r = _check(Stack())
    assert r.verdict == "PASS"
    assert events.count("dispatch") >= 12, events  # the 4 blocks, their norms and their fc's
    assert events.index("wait") > max(i for i, e in enumerate(events) if e == "dispatch"), events


def test_a_batched_layer_whose_run_fails_when_fetched_runs_again_alone(monkeypatch):
    # XLA reports a dispatched program's runtime errors when its results are fetched: a layer of
    # the batched program (the layers met once) whose fetch fails runs again in its own program
    # and keeps its row, as a failure at dispatch always did
    real_host = runs.to_host
    failed: list[int] = []

    def flaky(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        if not failed and leaves and not isinstance(leaves[0], np.ndarray):
            failed.append(1)
            raise RuntimeError("planted: the batched program's run failed")
        return real_host(tree)
    monkeypatch.setattr(runs, "shared_programs", lambda jobs: {})  # every layer in the batched program
    monkeypatch.setattr(runs, "to_host", flaky)
    r = _check(Stack())
    assert failed == [1]
    assert r.verdict == "PASS", r.summary()
    assert not any("could not run the Flax layer alone" in n for row in r.layers for n in row.notes), \
        [row.notes for row in r.layers]
