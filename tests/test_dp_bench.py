"""``parity bench --data-parallel N``: a tiny scaling run (mlp tiny, 2 devices, quick) from the CLI;
its jax part runs in a child process with 2 simulated CPU devices, its torch part on 2 gloo
processes. The report has both frameworks at every device count and says it is a functional run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from child_process import once_per_run
from parity.cli import main


def _bench(out: Path) -> dict:
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["bench", "--data-parallel", "2", "--models", "mlp", "--size", "tiny", "--quick",
                     "--out", str(out)])
    return {"code": code, "text": text.getvalue(), "out": str(out)}


@pytest.fixture(scope="module")
def run():
    # once per run, not once per xdist worker that gets one of its tests; the report files stay
    # in the run directory for both tests
    done = once_per_run("dp_bench", _bench)
    return done["code"], done["text"], Path(done["out"])


def test_cli_reports_both_frameworks_at_each_count(run):
    code, text, out = run
    assert code == 0, text
    [report] = out.glob("*_dp2_quick.json")
    payload = json.loads(report.read_text())
    assert payload["counts"] == [1, 2]
    got = {(r["framework"], r["devices"]) for r in payload["results"]}
    assert got == {(f, k) for f in ("jax", "torch") for k in (1, 2)}
    for r in payload["results"]:
        assert r["samples_per_s"] > 0 and r["per_device_batch"] * r["devices"] == payload["global_batch"]
        assert len(r["samples_s"]) == payload["steps"]
    assert [r["efficiency"] for r in payload["results"] if r["devices"] == 1] == [1.0, 1.0]
    assert payload["parity_gate"]["ok"] and payload["parity_gate"]["data_parallel"] == 2


def test_cpu_run_is_labelled_functional(run):
    code, text, out = run
    [report] = out.glob("*_dp2_quick.json")
    payload = json.loads(report.read_text())
    assert payload["functional_run"] is True and payload["jax_platform"] == "cpu"
    assert "FUNCTIONAL RUN, not a scaling number" in payload["note"]
    [md] = out.glob("*_dp2_quick.md")
    assert "FUNCTIONAL RUN, not a scaling number" in md.read_text()
    assert "FUNCTIONAL RUN, not a scaling number" in text and "parity gate" in text


@pytest.mark.parametrize("argv,message", [
    (["--data-parallel", "2", "--batch", "3"], "multiple of every device count"),
    (["--data-parallel", "2", "--models", "mlp", "cnn"], "one pair"),
    (["--data-parallel", "2", "--bf16"], "does not take --bf16"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


class _Started(Exception):
    pass


def test_children_start_in_the_checkout_that_runs_them(monkeypatch, tmp_path):
    """`python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: a caller
    standing in another checkout had its DDP workers and benchmark child import that checkout's
    parity (seen: KeyError 'out_cotangent_norm' from an older ddp.py). Both now start in the
    checkout that holds the running parity, with an absolute output path."""
    import subprocess

    from parity.benchmark import dp_scaling
    from parity.training import ddp

    seen = []

    def popen(args, **kwargs):
        seen.append((args, kwargs))
        raise _Started

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.chdir(tmp_path)
    root = str(Path(ddp.__file__).resolve().parents[2])
    with pytest.raises(_Started):
        ddp.run_ddp([], world=1)
    with pytest.raises(_Started):
        dp_scaling.run_in_child(dp_scaling.ScalingConfig(), Path("out"), log=lambda s: None)
    assert [kw.get("cwd") for _, kw in seen] == [root, root]
    assert seen[1][0][-1] == str(tmp_path / "out")
