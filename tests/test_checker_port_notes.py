"""What the checker reads off the port plan when the port provides it: pairing notes (pairings
not made by name) become report warnings; tied parameters are judged whole-model, not per layer."""
from __future__ import annotations

import numpy as np

import parity
import parity.pair
import planted


def _with_plan_attrs(monkeypatch, **attrs):
    real = parity.pair.build_plan

    def build(*a, **kw):
        plan = real(*a, **kw)
        for k, v in attrs.items():
            setattr(plan, k, v)
        return plan

    monkeypatch.setattr(parity.pair, "build_plan", build)


def test_pairing_notes_are_report_warnings(monkeypatch):
    _with_plan_attrs(monkeypatch, pairing_notes=["fc2 -> Dense_1: by shape and execution order"])
    x = planted.block_input(np.random.default_rng(0))
    r = parity.check(planted.make_torch_block(), planted.FlaxBlock(), x, dtype="float64", layers=False)
    assert r.ok
    assert "weight port pairing: fc2 -> Dense_1: by shape and execution order" in r.warnings
    assert "fc2 -> Dense_1" in str(r)


def test_tied_lm_passes_and_tied_names_are_judged_whole_model():
    # A real tied port (LM head sharing the embedding, Flax head = embed.attend): the port folds
    # the alias, the checker passes the correct twin and says why the tied names have no
    # per-layer gradient verdict (torch's gradient is the sum over every use).
    from test_port_llm import IDS, FlaxTiedLM, TiedLM

    torch_model = TiedLM()
    r = parity.check(torch_model, FlaxTiedLM(), IDS, dtype="float64")
    assert r.ok, r
    assert any("embed.weight is tied" in n for row in r.layers for n in row.notes)
    assert "grad embed.weight" in {c.name for c in r.param_grads}


def test_tied_lm_with_a_wrong_head_fails():
    from test_port_llm import IDS, FlaxTiedLM, TiedLM

    import flax.linen as nn

    class WrongHead(FlaxTiedLM):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(11, 6, name="embed")
            return 0.5 * embed.attend(nn.LayerNorm(epsilon=1e-5, name="norm")(embed(ids)))

    r = parity.check(TiedLM(), WrongHead(), IDS, dtype="float64")
    assert not r.ok
