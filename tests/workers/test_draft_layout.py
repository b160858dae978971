"""The `auto` draft layout and the start-up calibration (workers.draft_layout): `last` exactly
where the CPU GEMM runs a 3-row block and a 4-row one on different backends, the
engine following it, output AR's in the chosen layout, and the `every` block calibrated with its
MASK groups."""

import pytest

from tests.tiny import greedy_setup
from tests.workers.test_adaptive_stride import _llm
from workers import SamplingParams
from workers.draft_layout import auto_every_anchor
from workers.stride import StepCostModel

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_auto_layout_follows_the_gemm_row_split():
    assert auto_every_anchor(None) and auto_every_anchor({})  # one backend (EPYC): every
    assert not auto_every_anchor(dict.fromkeys((1, 2, 3), "torch"))  # F.linear to 3 rows, oneDNN from 4
    assert not auto_every_anchor(dict.fromkeys((1, 2, 3), "torch") | {4: "mkl"})  # MKL packed from 4 (Xeon SPR)
    assert auto_every_anchor(dict.fromkeys((1, 2), "torch"))  # both blocks on oneDNN
    assert auto_every_anchor(dict.fromkeys(range(1, 17), "mkl"))  # both on MKL packed


def test_every_block_is_calibrated_with_its_groups():
    calls = []

    def time_rows(rows, masks=0, groups=1):
        calls.append((rows, masks, groups))
        return 0.01 + 0.001 * rows + 0.002 * (masks > 0) + 0.003 * (groups > 1)

    every = StepCostModel.calibrate(time_rows, 64, masks=True, block_rows=4, block_groups=2)
    assert (4, 2, 2) in calls
    one = StepCostModel.calibrate(lambda r, m=0: time_rows(r, m), 64, masks=True, block_rows=4)
    # the groups' extra attention cost lands in the step cost of a block with MASK rows
    assert every.predict(4, 2) == pytest.approx(one.predict(4, 2) + 0.003, abs=1e-9)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return greedy_setup(request.param, seed=7, max_new=GREEDY.max_tokens)


@pytest.mark.parametrize("gemm_rows,every", [({}, True), (dict.fromkeys((1, 2, 3), "torch"), False)])
def test_engine_takes_the_layout_and_stays_exact(tiny, gemm_rows, every):
    loaded, prompts, ref = tiny
    loaded.model.gemm_rows = gemm_rows  # as workers.cpu_gemm measured it on that CPU
    try:
        llm = _llm(loaded, "risd")
        eng = llm.engine
        assert eng.every_anchor == every == eng.policy.every_anchor == eng.scheduler.every_anchor
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref
        # an explicit layout is kept; a fixed stride has no costs: `auto` is `every`
        assert _llm(loaded, "risd", draft_anchors="last").engine.every_anchor is False
        assert _llm(loaded, "risd", draft_anchors="every").engine.every_anchor is True
        assert _llm(loaded, "risd", adaptive_stride=False).engine.every_anchor is True
    finally:
        loaded.model.gemm_rows = None
        loaded.model.has_lora = False
