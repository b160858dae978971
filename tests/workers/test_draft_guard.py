"""The measured guard of the adaptive stride (workers.draft_guard): per load level it runs the arm
(the policy's strides, or every request AR) whose committed tokens per second are measured higher,
explores the other less and less often, and keeps the engine exact."""

import random

import pytest

from tests.tiny import greedy_setup
from workers import LLM, SamplingParams
from workers.draft_guard import DraftGuard, load_bucket
from workers.stride import AcceptanceEstimator, StepCostModel, StridePolicy


def _drive(guard: DraftGuard, load: int, steps: int, rate: dict[str, float], noise: float = 0.0,
           seed: int = 0) -> dict[str, int]:
    """Runs `steps` decode steps at `load` in a world where an arm commits `load` tokens per step at
    `rate[arm]` tokens per second (times jittered by +-noise); returns the steps run per arm."""
    rng = random.Random(seed)
    ran = {"policy": 0, "ar": 0}
    for _ in range(steps):
        arm = "policy" if guard.begin_step(load) else "ar"
        ran[arm] += 1
        seconds = load / rate[arm] * (1 + rng.uniform(-noise, noise))
        guard.end_step(load, seconds, counted=True)
    return ran


def test_load_buckets():
    assert [load_bucket(n) for n in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 24, 64, 65)] == \
        [1, 1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 16, 16, 24, 24, 64, 96]


def test_drafting_that_loses_is_dropped_and_tried_ever_less():
    g = DraftGuard(epoch_steps=16, min_patience=2, max_patience=32)
    ran = _drive(g, 4, 16 * 200, {"policy": 90.0, "ar": 100.0}, noise=0.1)
    lv = g.summary()[4]
    assert lv["best"] == "ar" and lv["patience"] == 32
    assert ran["policy"] < 0.06 * sum(ran.values())  # 1/patience, falling to 1/32
    assert lv["rate"]["ar"] == pytest.approx(100.0, rel=0.05) and lv["rate"]["policy"] == pytest.approx(90.0, rel=0.1)


def test_drafting_that_pays_is_kept():
    g = DraftGuard()
    ran = _drive(g, 1, 16 * 200, {"policy": 115.0, "ar": 100.0}, noise=0.1, seed=1)
    assert g.summary()[1]["best"] == "policy"
    assert ran["ar"] < 0.06 * sum(ran.values())


def test_a_change_of_workload_is_found():
    """Drafting loses, then (easier text: more drafts accepted) wins: found within max_patience epochs."""
    g = DraftGuard(epoch_steps=16, max_patience=8)
    _drive(g, 2, 16 * 100, {"policy": 80.0, "ar": 100.0})
    assert g.summary()[2]["best"] == "ar"
    ran = _drive(g, 2, 16 * 60, {"policy": 130.0, "ar": 100.0})
    assert g.summary()[2]["best"] == "policy" and ran["policy"] > 0.7 * sum(ran.values())


def test_levels_are_independent_and_prefill_steps_do_not_count():
    g = DraftGuard(epoch_steps=8)
    for _ in range(40):  # C = 1 pays, C = 16 does not, interleaved (an epoch resumes at its level)
        _drive(g, 1, 5, {"policy": 120.0, "ar": 100.0})
        _drive(g, 16, 3, {"policy": 70.0, "ar": 100.0})
    s = g.summary()
    assert s[1]["best"] == "policy" and s[16]["best"] == "ar"
    before = dict(g.steps_by_arm)
    for _ in range(50):
        g.begin_step(1)
        g.end_step(1, 10.0, counted=False)  # a step with prefill rows: 0.1 tok/s would sink an arm
    assert g.steps_by_arm == before and g.summary()[1]["best"] == "policy"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="epoch_steps"):
        DraftGuard(epoch_steps=0)
    with pytest.raises(ValueError):
        DraftGuard(min_patience=4, max_patience=2)


def test_an_ar_epoch_skips_the_policy():
    """While the guard runs AR the policy is not consulted: strides 1, no probe, no held stride."""
    pts = [1, 2, 4, 8, 16]
    g = DraftGuard(epoch_steps=4)
    pol = StridePolicy(4, adaptive=True, cost=StepCostModel(pts, [0.05] * 5), guard=g, probe_every=1,
                       acceptance=AcceptanceEstimator(3, prior=0.9, prior_weight=1e6))
    states = [pol.acceptance.new_state() for _ in range(2)]
    seen = set()
    for _ in range(64):
        strides, new = pol.choose(states)
        drafting = g.levels[2].arm == "policy"
        seen.add(drafting)
        if not drafting:
            assert strides == [1, 1] and new == 1 and not pol._hold and g.forcing_ar
        # the world: drafting commits 2.5x the tokens at 2x the time, AR is slower per token
        g.end_step(5 if max(strides) > 1 else 2, 0.1 if max(strides) > 1 else 0.05, counted=True)
    assert seen == {True, False} and g.summary()[2]["best"] == "policy"
    assert StridePolicy(4, adaptive=False, guard=g).guard is None  # a fixed stride has nothing to guard


def test_engine_with_guard_is_exact_and_runs_both_arms():
    """Greedy output with the guard (which forces AR epochs) equals AR token for token, and the
    forced AR steps leave the requests' acceptance evidence alone."""
    loaded, prompts, ref = greedy_setup("llama")
    llm = LLM(loaded=loaded, mode="isd", stride=4, adaptive_stride=True, stride_guard=True,
              kv_cache_tokens=8192, max_num_batched_tokens=512)
    g, acc = llm.engine.policy.guard, llm.engine.policy.acceptance
    g.epoch_steps = 3  # several epochs within one short generation
    aged_while_forced, age = [], acc.age

    def age_spy(state):
        aged_while_forced.append(g.forcing_ar)
        age(state)

    acc.age = age_spy
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in out] == ref
    assert g.steps_by_arm["policy"] > 0 and g.steps_by_arm["ar"] > 0
    assert not any(aged_while_forced)
    assert llm.stats().stride_guard_steps == g.steps_by_arm
    assert LLM(loaded=loaded, mode="isd", stride=4, stride_guard=False, kv_cache_tokens=8192).engine.policy.guard is None
    with pytest.raises(ValueError, match="stride_guard"):
        LLM(loaded=loaded, mode="isd", stride_guard="yes")


def test_with_a_guard_the_policy_makes_no_down_probe():
    """Without a guard the policy's probes include lone AR steps (the cost model's only view of AR
    while drafting); with one, its AR epochs give that view and the lone AR steps, which cut every
    draft, are not made."""
    ar_steps = {}
    for guarded in (False, True):
        pol = StridePolicy(4, adaptive=True, cost=StepCostModel([1, 2, 4, 8, 16], [0.05] * 5), probe_every=4,
                           acceptance=AcceptanceEstimator(3, prior=0.9, prior_weight=1e6),
                           guard=DraftGuard(epoch_steps=10**6) if guarded else None)  # one long policy epoch
        states = [pol.acceptance.new_state()]
        ar_steps[guarded] = sum(pol.choose(states)[0] == [1] for _ in range(64))
    assert ar_steps == {False: 8, True: 0}
