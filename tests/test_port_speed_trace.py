"""The plan's abstract trace of the Flax twin compiles nothing (cold-process cost the user waits for)."""
from __future__ import annotations

from child_process import run_json_child


def test_abstract_trace_compiles_nothing():
    # Fails when the init's PRNG keys are made outside the trace: jax.random.key(0) then compiles
    # XLA seeding computations in a fresh process (~0.1 s of a ViT-L port's ~0.4 s trace).
    result = run_json_child("speed_trace_child.py", timeout=120)
    assert result["compiled"] == [], f"compiled during the abstract trace: {result['compiled']}"
