"""The load-adaptive stride (workers.stride): its choice on fixed cost tables, its cost model, and
that any schedule of per-round strides keeps ISD exact (greedy = AR token for token; sampled output
follows the exact AR law)."""

import random

import numpy as np
import pytest
import torch

from tests.tiny import greedy_setup, tiny_loaded
from tests.workers.test_sampling_exactness import P_MIN, _chi2, _exact_ar_joint
from workers import LLM, SamplingParams
from workers.stride import (
    AcceptanceEstimator,
    StepCostModel,
    StridePolicy,
    round_value,
    value_table,
    value_tables,
)

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


class RandomStrides(StridePolicy):
    """A forced random schedule: every decoding request gets a uniform stride in 1..N each round."""

    def __init__(self, max_stride: int, seed: int) -> None:
        super().__init__(max_stride, adaptive=True)
        self.rng = random.Random(seed)
        self.seen: set[int] = set()

    def choose(self, states, other_rows=0, pending=0):
        n = [self.rng.randint(1, self.max_stride) for _ in range(len(states) + 1)]
        self.seen.update(n)
        return n[:-1], n[-1]


def _policy(times, points, rates, max_stride=4):
    acc = AcceptanceEstimator(max_stride - 1, prior=rates, prior_weight=1e6)
    return StridePolicy(max_stride, adaptive=True, cost=StepCostModel(points, times), acceptance=acc)


# -- the choice on fixed cost tables ------------------------------------------------------------
def test_memory_bound_table_picks_the_largest_stride_at_c1():
    pts = [1, 2, 4, 8, 16, 64, 256]
    flat = [0.050] * len(pts)  # a memory-bound forward: more rows cost nothing
    pol = _policy(flat, pts, 0.8)
    strides, new = pol.choose([pol.acceptance.new_state()])
    assert strides == [4] and new == 4
    # the same with a 10% slope over the first rows (the paper's GPU alpha ~1.1) at C=1
    pol = _policy([0.050, 0.051, 0.052, 0.054, 0.058, 0.1, 0.4], pts, 0.8)
    assert pol.choose([pol.acceptance.new_state()])[0] == [4]


def test_compute_bound_table_picks_1():
    pts = [1, 2, 4, 8, 16, 64, 256]
    linear = [0.01 * p for p in pts]  # a compute-bound forward: time proportional to rows
    pol = _policy(linear, pts, 0.8)
    states = [pol.acceptance.new_state() for _ in range(8)]
    strides, new = pol.choose(states)
    assert strides == [1] * 8 and new == 1


def test_load_moves_the_choice_down():
    """Cheap rows up to 16, then compute-bound: one request runs N=4, 64 requests run AR."""
    pts = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    times = [0.05, 0.05, 0.05, 0.05, 0.052, 0.1, 0.2, 0.4, 0.8, 1.6]
    pol = _policy(times, pts, 0.7)
    assert pol.choose([pol.acceptance.new_state()])[0] == [4]
    assert set(pol.choose([pol.acceptance.new_state() for _ in range(64)])[0]) == {1}


def test_a_wave_of_new_requests_starts_at_the_stride_for_its_load():
    pts = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    times = [0.05, 0.05, 0.05, 0.05, 0.052, 0.1, 0.2, 0.4, 0.8, 1.6]
    pol = _policy(times, pts, 0.7)
    assert pol.choose([], 0)[1] == 4  # one new request alone: the longest stride
    assert pol.choose([], 2000, pending=64)[1] == 1  # 64 in prefill: they start AR
    assert pol.choose([], 40, pending=1)[1] == 4


def test_low_acceptance_prefers_short_strides_even_when_rows_are_free():
    pol = _policy([0.05, 0.05, 0.05], [1, 8, 64], 0.05, max_stride=8)
    e, _ = value_table([0.05] * 7, 8)
    assert pol.choose([pol.acceptance.new_state()])[0] == [int(e.argmax()) + 1]


def test_round_value_is_the_papers_tpf_formula():
    for p in (0.3, 0.7, 0.9):
        for n in (2, 3, 4, 8):
            e, rows = round_value([p] * (n - 1), n)
            paper = (2 + sum(p**i for i in range(1, n - 1))) / (2 - p ** (n - 1))
            assert e == pytest.approx(paper)
            assert n <= rows <= 2 * n - 1
    assert round_value([], 1) == (1.0, 1.0)
    e, r = value_table([0.7, 0.6, 0.5], 4)
    for n in (1, 2, 3, 4):
        assert round_value([0.7, 0.6, 0.5], n) == pytest.approx((e[n - 1], r[n - 1]))


# -- cost model and acceptance estimate ---------------------------------------------------------
def test_cost_model_interpolates_calibrates_and_refines():
    calls = []

    def fake(rows, masks=0):
        calls.append(rows)
        return 0.01 + 0.001 * rows + 0.004 * (masks > 0) + 0.002 * masks

    m = StepCostModel.calibrate(fake, 100, masks=True)
    assert m.points == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 100] and calls[:2] == [1, 7]  # warm-ups first
    assert m.mask_cost == pytest.approx(0.002) and m.lora_cost == pytest.approx(0.004)  # 7-row blocks, 1 and 6 MASKs
    # a GEMM that changes backend between 3 and 4 rows (workers.cpu_gemm): the 3-row step is
    # priced as measured, not between 2 and 4
    step = StepCostModel.calibrate(lambda r, m=0: 0.01 if r <= 3 else 0.02, 64)
    assert step.predict(3) == pytest.approx(0.01) and step.predict(4) == pytest.approx(0.02)
    calls.clear()
    m3 = StepCostModel.calibrate(fake, 100, masks=True, block_rows=3)  # the engine's stride-2 block, one group
    assert calls[:2] == [1, 3] and m3.mask_cost == pytest.approx(0.002) and m3.lora_cost == pytest.approx(0.004)
    assert m.predict(7, 3) == pytest.approx(fake(7, 3))
    assert m.predict(50) == pytest.approx(0.06)
    assert m.slope(50) == pytest.approx(0.001)
    assert m.predict(200) == pytest.approx(0.21)  # extrapolated on the last slope
    for _ in range(200):  # the machine got slower at 40 rows: the model follows
        m.observe(40, 0.1)
    assert m.predict(40) == pytest.approx(0.1, rel=0.02)
    pred = [m.predict(r) for r in range(1, 200)]
    assert all(b >= a for a, b in zip(pred, pred[1:]))  # still monotone
    for _ in range(300):  # steps at 4 and 64 rows twice as dear as forwards: the scale follows
        m.observe(4, 2 * fake(4))
        m.observe(64, 2 * fake(64))
    assert m.scale == pytest.approx(2.0, rel=0.1) and m.predict(16) == pytest.approx(2 * fake(16), rel=0.05)
    with pytest.raises(ValueError, match="points"):
        StepCostModel([4, 2], [0.1, 0.2])


def test_step_overhead_learnt_at_run_row_counts_reaches_the_others():
    """Calibration times forwards alone; steps also pay a row-independent overhead. Observed only at
    the row counts the policy runs, it must still lift the points it does not run, so the policy
    learns that long strides are relatively cheaper and moves to them."""
    def forward(r):
        return 0.02 + 0.003 * r

    def step(r):
        return forward(r) + 0.05

    m = StepCostModel.calibrate(forward, 64)
    for _ in range(300):  # a stride-2 steady state: cold (2 rows) and verify (3 rows) rounds
        m.observe(2, step(2))
        m.observe(3, step(3))
    for r in (1, 7, 16):
        assert m.predict(r) == pytest.approx(step(r), rel=0.05)


def test_mask_row_cost_is_learnt_from_steps_with_and_without_them():
    """Calibrated at no extra cost for MASK rows, steps show 30 ms for having any and 5 ms each: the
    fit finds both, and the policy, which knows a stride-n round carries n-1 MASK rows, stops
    drafting."""
    pts, flat = [1, 2, 4, 8, 16, 64], [0.05] * 6
    pol = _policy(flat, pts, 0.6)
    state = pol.acceptance.new_state()
    assert pol.choose([state])[0] == [4]
    for i in range(300):
        masks = (0, 1, 3)[i % 3]
        pol.cost.observe(4, 0.05 + 0.03 * (masks > 0) + 0.005 * masks, masks)
    assert pol.cost.mask_cost == pytest.approx(0.005, rel=0.2) and pol.cost.lora_cost == pytest.approx(0.03, rel=0.1)
    pol.probe_every = 0
    assert pol.choose([state])[0] == [1]


def test_an_up_probe_from_all_ar_is_held_so_its_drafts_are_verified():
    """Drafting dear at this acceptance (0.3, a 20 ms gated-LoRA cost on 50 ms steps): the policy
    runs AR; its periodic up-probe (which could pay were the drafts accepted) gives the requests
    stride 2, and the next step keeps them at 2 so the drafts are verified (a stride of 1 would cut
    them, and acceptance could then never be learnt again)."""
    pts = [1, 2, 4, 8, 16, 64]
    pol = _policy([0.05] * 6, pts, 0.3)
    pol.cost = StepCostModel(pts, [0.05] * 6, lora_cost=0.02)
    states = [pol.acceptance.new_state() for _ in range(2)]
    runs = [pol.choose(states)[0] for _ in range(4 * pol.probe_every + 1)]
    probe = 4 * pol.probe_every - 1
    assert all(r == [1, 1] for i, r in enumerate(runs) if i not in (probe, probe + 1))
    assert runs[probe] == runs[probe + 1] and max(runs[probe]) == 2
    assert pol.choose([pol.acceptance.new_state()])[0] == [1]  # the hold is for that request only


def test_no_up_probe_where_drafting_cannot_pay_at_any_acceptance():
    """A 100 ms gated-LoRA cost on 50 ms steps: even drafts that are always accepted (2 tokens per
    round for 3x the time) lose, so the up-probes are skipped and every step stays AR; the same
    policy with the LoRA cost at 20 ms probes (the test above)."""
    pts = [1, 2, 4, 8, 16, 64]
    pol = _policy([0.05] * 6, pts, 0.3)
    pol.cost = StepCostModel(pts, [0.05] * 6, lora_cost=0.1)
    states = [pol.acceptance.new_state() for _ in range(2)]
    runs = [pol.choose(states)[0] for _ in range(8 * pol.probe_every + 1)]
    assert all(r == [1, 1] for r in runs)
    pol.cost = StepCostModel(pts, [0.05] * 6, lora_cost=0.02)
    assert any(max(pol.choose(states)[0]) == 2 for _ in range(4 * pol.probe_every + 1))


def test_vectorised_value_tables_equal_the_per_request_ones():
    rng = np.random.default_rng(0)
    rates = rng.uniform(0, 1, size=(9, 5))
    for every in (False, True):
        E, R = value_tables(rates, 6, every)
        for k in range(9):
            e, r = value_table(list(rates[k]), 6, every)
            assert np.allclose(E[k], e) and np.allclose(R[k], r)
            for n in range(1, 7):
                if not every:
                    assert round_value(list(rates[k]), n) == pytest.approx((e[n - 1], r[n - 1]))


def test_policy_moves_to_the_stride_whole_steps_favour():
    def forward(r):
        return 0.02 + 0.003 * r

    acc = AcceptanceEstimator(3, prior=0.7, prior_weight=1e6)
    pol = StridePolicy(4, adaptive=True, cost=StepCostModel.calibrate(forward, 64), acceptance=acc)
    state = acc.new_state()
    assert pol.choose([state])[0][0] < 4  # forwards alone: the 7-row block looks dear
    seen = set()
    for i in range(400):
        (n,), _ = pol.choose([state])
        seen.add(n)
        rows = n if i % 2 else 2 * n - 1  # cold and verify rounds in turn
        pol.cost.observe(rows, forward(rows) + 0.05)  # whole steps: the overhead on every one
    pol.probe_every = 0
    assert pol.choose([state])[0] == [4] and 4 in seen


def test_acceptance_estimate_starts_at_the_engine_prior_and_moves_to_the_request():
    acc = AcceptanceEstimator(3, prior=0.5, prior_weight=4.0)
    good, bad = acc.new_state(), acc.new_state()
    assert acc.rates(good) == pytest.approx([0.5, 0.5, 0.5])
    for _ in range(30):
        acc.observe(good, 3, 3)  # every draft accepted
        acc.observe(bad, 3, 0)  # first draft rejected: positions 1, 2 not tried
    rg, rb = acc.rates(good), acc.rates(bad)
    assert rg[0] > 0.8 and rb[0] < 0.2
    assert bad[0][1] == 0.0 and bad[0][0] > 0  # untried positions are not counted as rejections
    assert 0.2 < acc.engine_rates()[0] < 0.8  # the engine-wide figure mixes both


# -- exactness under any stride schedule --------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return greedy_setup(request.param, seed=3, max_new=GREEDY.max_tokens)


def _llm(loaded, mode, **kw):
    loaded.model.has_lora = mode == "risd"
    return LLM(loaded=loaded, mode=mode, stride=4, kv_cache_tokens=8192, max_num_batched_tokens=512, **kw)


@pytest.mark.parametrize("mode", ["isd", "risd"])
def test_greedy_equal_with_adaptive_on_and_off_and_forced_random_strides(tiny, mode):
    loaded, prompts, ref = tiny
    for adaptive in (True, False):
        llm = _llm(loaded, mode, adaptive_stride=adaptive)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref, f"adaptive={adaptive} batch 8"
        assert llm.generate([prompts[2]], GREEDY)[0].token_ids == ref[2], f"adaptive={adaptive} batch 1"
    for seed in range(3):
        llm = _llm(loaded, mode)
        forced = RandomStrides(4, seed)
        llm.engine.scheduler.policy = forced
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref, f"random strides seed {seed}"
        st = llm.stats()
        assert forced.seen == {1, 2, 3, 4} and set(st.rounds_by_stride) >= {1, 2, 3, 4}
        assert st.draft_tokens > 0
    loaded.model.has_lora = False


def test_sampled_isd_with_random_per_round_strides_follows_the_ar_law():
    V, n = 10, 3000
    loaded = tiny_loaded("qwen3", vocab_size=V, seed=21, std=0.25, lora_rank=0)
    prompt = [1, 4, 2, 7]
    params = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=s) for s in range(n)]
    exact = _exact_ar_joint(loaded.model, prompt, params[0], V)
    llm = LLM(loaded=loaded, mode="isd", stride=4, max_num_seqs=512, max_num_batched_tokens=4096, kv_cache_tokens=65536)
    llm.engine.scheduler.policy = RandomStrides(4, seed=5)
    outs = llm.generate([prompt] * n, params)
    st = llm.stats()
    assert st.rounds["verify_accept"] + st.rounds["verify_reject"] >= n // 2
    assert set(st.rounds_by_stride) == {1, 2, 3, 4}
    idx = torch.tensor([o.token_ids[0] * V * V + o.token_ids[1] * V + o.token_ids[2] for o in outs])
    assert _chi2(torch.bincount(idx, minlength=V**3).float(), exact.float()) > P_MIN


def test_engine_records_strides_and_predicted_step_time(tiny):
    loaded, prompts, ref = tiny
    llm = _llm(loaded, "isd")
    assert llm.engine.policy.adaptive and llm.engine.policy.cost is not None
    llm.generate(prompts[:1], GREEDY)
    st = llm.stats()
    assert sum(st.rounds_by_stride.values()) == st.decode_forwards
    assert st.step_time_predicted > 0 and st.step_time_measured > 0
    fixed = _llm(loaded, "isd", adaptive_stride=False)
    fixed.generate(prompts[:1], GREEDY)
    assert set(fixed.stats().rounds_by_stride) == {4} and fixed.engine.policy.cost is None


def test_adaptive_stride_config_is_validated():
    with pytest.raises(ValueError, match="^adaptive_stride"):
        LLM(loaded=tiny_loaded("llama"), mode="isd", adaptive_stride="yes")
