"""parity bench --check-cost's pieces (parity/benchmark/check_cost.py): the floor with the twin's
own float64 run really runs that run, and the table compares a check with the floor it needed."""
from __future__ import annotations

import torch

import parity.checker
from parity.benchmark import check_cost
from parity.benchmark.check_cost import Cost, table
from planted import make_flax_block, make_torch_block


def test_floor_own_runs_the_twins_float64_run_and_the_floor_does_not(monkeypatch):
    calls = []
    real = parity.checker._flax_values
    monkeypatch.setattr(parity.checker, "_flax_values", lambda run, d: calls.append(d) or real(run, d))
    x = torch.randn(3, 8)
    assert check_cost._floor(make_torch_block(), make_flax_block(), x, {}) == "floor" and calls == []
    assert check_cost._floor(make_torch_block(), make_flax_block(), x, {}, own=True) == "floor"
    assert calls == ["float64"]


def test_table_ratios_against_the_floor_the_check_needed():
    costs = [Cost("m", "floor", 10.0, 100.0, 1.0, "floor"), Cost("m", "floor-own", 15.0, 150.0, 1.0, "floor"),
             Cost("m", "check", 18.0, 165.0, 1.0, "PASS", own_noise=True),
             Cost("m", "check-layers", 30.0, 300.0, 1.0, "PASS")]
    rows = {line.split(" | ")[1]: line.split(" | ") for line in table(costs).splitlines()[2:]}
    own = rows["check (own noise run)"]
    assert own[3:6] == ["1.80", "1.20", "165"] and own[6:8] == ["1.65", "1.10"]
    plain = rows["check-layers"]
    assert plain[3:5] == ["3.00", ""] and plain[6:8] == ["3.00", ""]  # no own-noise run: no floor-own ratio


def test_a_run_that_dies_is_a_row_saying_so_and_the_others_still_run(monkeypatch):
    def child(module, args):
        if args[1] == "check-layers":  # as the OOM killer ends a run: SIGKILL, nothing on stderr
            raise RuntimeError(f"{module} child {' '.join(args)} failed, killed by signal 9 (SIGKILL: the OOM "
                               "killer?):\n")
        return {"workload": args[0], "kind": args[1], "wall_s": 1.0, "peak_rss_growth_mib": 2.0, "model_mib": 1.0}

    monkeypatch.setattr(check_cost, "in_fresh_process", child)
    costs = check_cost.measure(["m"], ("floor", "check-layers", "check"))
    assert [c.kind for c in costs] == ["floor", "check-layers", "check"]
    assert costs[1].verdict.startswith("failed: ") and "killed by signal 9" in costs[1].verdict
    assert costs[2].wall_s == 1.0
    assert "killed by signal 9" in table(costs)


def test_repeated_runs_keep_the_least_wall_and_memory(monkeypatch):
    walls, rss = iter([3.0, 2.0, 4.0]), iter([30.0, 50.0, 20.0])
    monkeypatch.setattr(check_cost, "in_fresh_process", lambda module, args: {
        "workload": args[0], "kind": args[1], "wall_s": next(walls), "peak_rss_growth_mib": next(rss),
        "model_mib": 1.0})
    (c,) = check_cost.measure(["m"], ("check",), repeat=3)
    assert (c.wall_s, c.peak_rss_growth_mib, c.runs) == (2.0, 20.0, 3)
