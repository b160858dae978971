"""The `auto` draft layout (workers.draft_layout): chosen from the step costs the engine measures
at start. Synthetic forward-time tables stand in for the measurement (the thing under test is the
choice and the engine following it, not the timer); output stays AR's in the chosen layout."""

import pytest

from tests.tiny import greedy_setup
from tests.workers.test_adaptive_stride import _llm
from workers import SamplingParams
from workers.draft_layout import choose_layout, layout_rate
from workers.model_runner import ModelRunner
from workers.stride import StepCostModel

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PRIOR = [0.5, 0.5, 0.5]


def flat(rows: int, masks: int = 0) -> float:
    """Memory-bound: every row nearly free (the EPYC's oneDNN curve)."""
    return 0.010 + 0.0002 * rows + 0.0002 * (masks > 0)


def knee_at_4(rows: int, masks: int = 0) -> float:
    """A cheap 1-3-row path, then a backend 1.5x dearer (the Xeon's MKL to oneDNN step)."""
    base = 0.010 * (1 + 0.08 * (rows - 1)) if rows <= 3 else 0.015 + 0.0005 * rows
    return base + 0.0008 * (masks > 0) + 0.0002 * masks


def test_layout_rate_follows_the_cost_curve():
    for f, every_wins in ((flat, True), (knee_at_4, False)):
        every = StepCostModel.calibrate(f, 64, masks=True, block_rows=4)
        last = StepCostModel.calibrate(f, 64, masks=True, block_rows=3)
        r_every, r_last = layout_rate(every, 4, True, PRIOR), layout_rate(last, 4, False, PRIOR)
        assert (r_every >= r_last) == every_wins, (f.__name__, r_every, r_last)
        assert choose_layout(f, lambda e: 64, 4, PRIOR)[0] == every_wins
    # no drafting pays at all: both layouts' best is AR, the same step: a tie keeps `every`
    assert choose_layout(flat, lambda e: 64, 4, [0.0, 0.0, 0.0])[0]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return greedy_setup(request.param, seed=7, max_new=GREEDY.max_tokens)


@pytest.mark.parametrize("table,every", [(flat, True), (knee_at_4, False)])
def test_engine_takes_the_measured_layout_and_stays_exact(tiny, monkeypatch, table, every):
    loaded, prompts, ref = tiny
    monkeypatch.setattr(ModelRunner, "time_rows", lambda self, rows, masks=0: table(rows, masks))
    llm = _llm(loaded, "risd")
    eng = llm.engine
    assert eng.every_anchor == every == eng.policy.every_anchor == eng.scheduler.every_anchor
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref
    # an explicit layout is kept whatever the costs; a fixed stride has no costs: `auto` is `every`
    assert _llm(loaded, "risd", draft_anchors="last").engine.every_anchor is False
    assert _llm(loaded, "risd", draft_anchors="every").engine.every_anchor is True
    assert _llm(loaded, "risd", adaptive_stride=False).engine.every_anchor is True
    loaded.model.has_lora = False
