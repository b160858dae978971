"""MASK groups at every anchor (`draft_anchors="every"`, workers.isd / workers.attention): each
group's logits are exactly what a cold round after its anchor computes, the clean rows are the
causal ones, output is AR's in both layouts, a rejection no longer costs a cold round, and the
stride value of the layout."""

import pytest
import torch

from tests.tiny import greedy_setup
from tests.workers.test_adaptive_stride import _llm
from workers import SamplingParams
from workers.batch_layout import StepBatch
from workers.stride import AcceptanceEstimator, StepCostModel, StridePolicy, value_table

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return greedy_setup(request.param, seed=5, max_new=GREEDY.max_tokens)


def _run(runner, reqs, mask_id):
    """One eager SDPA step of requests (ctx, clean ids, groups, rows per group, blocks), logits at
    every row -> per request its logits [rows, V] in request order."""
    b = StepBatch()
    for ctx, clean, g, s, table in reqs:
        b.ids += clean
        b.ctx.append(ctx)
        b.c_real.append(len(clean))
        b.m_real.append(g * s)
        b.groups.append(g)
        b.tables.append(table)
    b.c_slot, b.m_slot = list(b.c_real), list(b.m_real)
    b.ids += [mask_id] * sum(b.m_real)
    ro = 0
    for c, m in zip(b.c_real, b.m_real):
        b.logit_offsets.append(len(b.logit_rows))
        b.logit_rows += range(ro, ro + c + m)
        ro += c + m
    logits = runner._execute_sdpa(b).logits
    out, pos = [], 0
    for c, m in zip(b.c_real, b.m_real):
        out.append(logits[pos : pos + c + m])
        pos += c + m
    return out


@pytest.mark.parametrize("mode", ["isd", "risd"])
def test_each_group_equals_a_cold_round_at_its_anchor(tiny, mode):
    """Two requests in one step (so the rows are gathered, not in place), one with its prompt in
    the cache: group a of each is compared with a fresh forward of the tokens up to its anchor
    followed by one MASK group; the clean rows with a forward without MASK rows."""
    loaded, prompts, _ = tiny
    llm = _llm(loaded, mode)
    runner, mask_id = llm.engine.runner, llm.engine.mask_token_id
    s = 3
    p0, p1 = prompts[0][:10], prompts[1][:7]
    d0, d1 = [5, 9, 11], [3]
    t0, t1 = [0, 1], [2, 3]
    _run(runner, [(0, p0[:-1], 1, 0, t0)], mask_id)  # the cache holds p0[:-1]
    got = _run(runner, [(len(p0) - 1, [p0[-1]] + d0, len(d0) + 1, s, t0), (0, p1 + d1, len(d1) + 1, s, t1)], mask_id)
    for req, (prompt, drafts, g, table) in enumerate([(p0, d0, 4, [4, 5]), (p1, d1, 2, [6, 7])]):
        x = got[req]
        c = x.shape[0] - g * s
        clean = _run(runner, [(0, prompt + drafts, 1, 0, table)], mask_id)[0]
        torch.testing.assert_close(x[-(len(drafts) + 1) - g * s : c], clean[len(prompt) - 1 :], rtol=1e-5, atol=1e-5)
        for a in range(g):
            cold = _run(runner, [(0, (prompt + drafts)[: len(prompt) + a], 1, s, table)], mask_id)[0]
            torch.testing.assert_close(x[c + a * s : c + (a + 1) * s], cold[-s:], rtol=1e-5, atol=1e-5,
                                       msg=f"request {req} group {a}")
        # the groups differ from each other (each saw a different prefix): the check has teeth
        assert not torch.allclose(x[c : c + s], x[c + (g - 1) * s : c + g * s], atol=1e-3)
    loaded.model.has_lora = False


@pytest.mark.parametrize("mode", ["isd", "risd"])
def test_greedy_equals_ar_in_both_layouts_and_every_has_no_cold_rounds_after_rejections(tiny, mode):
    loaded, prompts, ref = tiny
    cold = {}
    for anchors in ("last", "every"):
        llm = _llm(loaded, mode, adaptive_stride=False, draft_anchors=anchors)
        assert llm.engine.every_anchor == (anchors == "every")
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref, anchors
        assert llm.generate([prompts[3]], GREEDY)[0].token_ids == ref[3], f"{anchors} batch 1"
        st = llm.stats()
        assert st.rounds["verify_reject"] > 0
        cold[anchors] = st.rounds["cold"]
    # every request's first round is cold, and up to two at its end (max_tokens leaves no room
    # for MASK rows: nothing to draft); with groups at every anchor a rejection costs none
    n_req = len(prompts) + 1
    assert cold["every"] <= 3 * n_req < cold["last"], cold
    loaded.model.has_lora = False


def test_auto_is_every_on_the_sdpa_path_and_every_is_refused_on_the_kernel_path(tiny, monkeypatch):
    loaded, _, _ = tiny
    # a fixed stride: `every`; an adaptive one measures (tests/workers/test_draft_layout.py)
    assert _llm(loaded, "isd", adaptive_stride=False).engine.every_anchor
    assert not _llm(loaded, "ar").engine.every_anchor
    with pytest.raises(ValueError, match="^draft_anchors"):
        _llm(loaded, "isd", draft_anchors="first")
    monkeypatch.setenv("IDLM_ATTENTION", "triton")
    assert not _llm(loaded, "isd").engine.every_anchor
    with pytest.raises(ValueError, match="^draft_anchors"):
        _llm(loaded, "isd", draft_anchors="every")


def test_every_anchor_round_value_and_choice():
    rates = [0.6, 0.5, 0.4]
    e, r = value_table(rates, 4, every_anchor=True)
    assert e.tolist() == pytest.approx([1.0, 1.6, 1.6 + 0.3, 1.6 + 0.3 + 0.12])
    assert r.tolist() == [1.0, 4.0, 9.0, 16.0]
    pts = [1, 2, 4, 8, 16, 64, 256]
    for times, want in (([0.050] * len(pts), 4), ([0.050 * p for p in pts], 1)):
        acc = AcceptanceEstimator(3, prior=0.6, prior_weight=1e6)
        pol = StridePolicy(4, adaptive=True, cost=StepCostModel(pts, times), acceptance=acc, probe_every=0,
                           every_anchor=True)
        assert pol.choose([acc.new_state()], 0)[0] == [want]


def test_a_request_run_ar_returns_to_the_engine_estimate():
    acc = AcceptanceEstimator(3, prior=0.6, prior_weight=4.0)
    st = acc.new_state()
    for _ in range(10):
        acc.observe(st, 3, 0)  # ten rejections of the first draft
    low = acc.rates(st)[0]
    for _ in range(30):
        acc.age(st)  # thirty AR rounds
    assert low < 0.3 and acc.rates(st)[0] > acc.engine_rates()[0] - 0.05


def test_the_kept_group_is_the_one_after_the_last_accepted_row(tiny):
    """After every step, each sampled request's stored q (the rows its drafts were drawn from) is
    what a cold round after its second-to-last token computes: the right group was kept (and its
    logits, computed only for that group, are the model's), after rejections as after accepts."""
    loaded, prompts, _ = tiny
    llm = _llm(loaded, "risd", adaptive_stride=False)
    eng = llm.engine
    spare = list(range(eng.config.num_blocks - 16, eng.config.num_blocks))  # blocks no request gets here
    for i, p in enumerate(prompts[:4]):
        eng.add_request(p, SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=i))
    checked = 0
    for _ in range(60):
        if not eng.has_unfinished():
            break
        eng.step()
        for req in list(eng.requests.values()):
            if req.draft_logits is None or not req.drafts:
                continue
            m = req.draft_logits.shape[0]
            toks = list(req.all_token_ids)
            cold = _run(eng.runner, [(0, toks[:-1], 1, m, spare)], eng.mask_token_id)[0][-m:]
            torch.testing.assert_close(req.draft_logits, cold, rtol=1e-4, atol=1e-4)
            checked += 1
    rejected = llm.stats().rounds["verify_reject"]
    assert checked > 20 and rejected > 5
    loaded.model.has_lora = False
