"""One training loop, two torch steppers: torch stepped in this process (train_check) and torch steps
served from records (a fake stepper; the data-parallel path's DDPStepper, fed in-process records on
a 1-device mesh) give the same per-step comparisons, and a planted optimizer bug is named on every
path: the comparison and the diagnosis live in the loop, not in a stepper."""
from __future__ import annotations

import optax
import pytest

from parity.registry import PAIRS
from parity.training import OptimizerSpec, train_check
from parity.training._loop import train_pair
from parity.training._settings import TrainSettings
from parity.training._stepper import LocalStepper
from parity.training.data import synthetic_batches
from parity.training.ddp_train import plan_checks

STEPS = 4
SPEC = OptimizerSpec("sgd-momentum", lr=0.1)
# nesterov where torch runs heavy-ball momentum: the Flax updates differ from step 1 or 2 on
NESTEROV = optax.sgd(0.1, momentum=0.9, nesterov=True)


def _case():
    pair = PAIRS["mlp"]
    cfg = pair.config("tiny")
    tm, fm = pair.build(cfg, seed=0)
    return tm, fm, synthetic_batches(pair, cfg, tm, batch=4, n_batches=3)


class _Recording(LocalStepper):
    """The in-process stepper, keeping every step it served in ``sides``."""

    def __init__(self, pair, settings, sides: list):
        super().__init__(pair, settings)
        self.sides = sides

    def step(self, k, batch):
        side = super().step(k, batch)
        self.sides.append(side)
        return side


class _Replay:
    """A TorchStepper that serves torch steps recorded earlier, as DDPStepper serves rank 0's."""

    mesh = None

    def __init__(self, sides):
        self.sides, self.served, self.closed = sides, [], False

    def step(self, k, batch):
        self.served.append(k)
        return self.sides[k - 1]

    def annotate(self, report):
        report.notes.append("replayed")

    def close(self):
        self.closed = True


def _comparisons(report) -> list[dict]:
    return [c.to_dict() for s in report.steps for c in s.comparisons]


def _record(tm, fm, data, flax_optimizer):
    """train_check's local path, with its torch steps kept."""
    settings = TrainSettings(steps=STEPS, optimizer=SPEC, input_layout="as_is", flax_optimizer=flax_optimizer)
    sides: list = []
    report = train_pair(tm, fm, data, settings, lambda pair: _Recording(pair, settings, sides))
    return settings, report, sides


@pytest.mark.parametrize("flax_optimizer", [None, NESTEROV], ids=["correct", "planted-nesterov"])
def test_replayed_steps_give_the_local_paths_results(flax_optimizer):
    tm, fm, data = _case()
    local = train_check(tm, fm, data, steps=STEPS, optimizer=SPEC, input_layout="as_is",
                        flax_optimizer=flax_optimizer)
    settings, recorded, sides = _record(tm, fm, data, flax_optimizer)
    replay = _Replay(sides)
    replayed = train_pair(tm, fm, data, settings, lambda pair: replay)

    assert replay.served == list(range(1, STEPS + 1)) and replay.closed
    assert _comparisons(replayed) == _comparisons(recorded) == _comparisons(local)
    assert replayed.ok == local.ok == (flax_optimizer is None)
    assert "replayed" in replayed.notes  # the stepper's own notes, beside the loop's
    if flax_optimizer is not None:  # the optimizer diagnosis is the loop's: named on both paths
        for report in (local, replayed):
            named = [f for f in report.findings if f.startswith("optimizer convention:")]
            assert named and "nesterov" in named[0], report.findings


@pytest.mark.parametrize("flax_optimizer", [None, NESTEROV], ids=["correct", "planted-nesterov"])
def test_data_parallel_path_is_the_same_loop(flax_optimizer):
    """The data-parallel path's DDPStepper, fed these torch steps as rank 0's records (one
    replica: the step of one process), with the Flax step on a 1-device mesh: the same per-step
    comparisons, and the planted optimizer bug named."""
    tm, fm, data = _case()
    _, recorded, sides = _record(tm, fm, data, flax_optimizer)
    checks = plan_checks([dict(torch_module=tm, flax_module=fm, data=data, data_parallel=1, steps=STEPS,
                               optimizer=SPEC, input_layout="as_is", flax_optimizer=flax_optimizer)])
    [report] = checks.reports([[{"seconds": 0.0, "step": side} for side in sides]])

    assert _comparisons(report) == _comparisons(recorded)
    assert report.ok == (flax_optimizer is None)
    assert any(n.startswith("data_parallel=1:") for n in report.notes)
    if flax_optimizer is not None:
        named = [f for f in report.findings if f.startswith("optimizer convention:")]
        assert named and "nesterov" in named[0], report.findings


def test_stepper_is_closed_when_the_loop_fails():
    tm, fm, data = _case()

    class Broken(_Replay):
        def step(self, k, batch):
            raise RuntimeError("torch side gone")

    broken = Broken([])
    with pytest.raises(RuntimeError, match="torch side gone"):
        train_pair(tm, fm, data, TrainSettings(steps=2, input_layout="as_is"), lambda pair: broken)
    assert broken.closed
