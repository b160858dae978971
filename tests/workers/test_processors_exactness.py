"""Greedy ISD / R-ISD with logits processors equal greedy AR with the same processors, token for
token (workers.logits_processors), on tiny random Llama and Qwen3 models, against an independent
oracle (tests/sampling_oracle.py: one row at a time, dense recomputation).

Drafts come three ways: the model's own MASK proposals; an oracle drafter that proposes the true
continuation (so every row of every block is verified: all must be accepted, which holds only if
row j is processed with the drafts before it in its history); and a drafter that repeats the true
next token (repeated tokens inside a block, which the penalties must count per row)."""

from collections import Counter

import pytest

from tests.sampling_oracle import naive_generate
from tests.tiny import naive_greedy, random_prompts, tiny_loaded
from workers import LLM, SamplingParams

MAX_NEW = 24
CASES = {
    "repetition_penalty": dict(repetition_penalty=1.5),
    "frequency_penalty": dict(frequency_penalty=1.0),
    "presence_penalty": dict(presence_penalty=1.5),
    "logit_bias": dict(logit_bias={5: 3.0, 17: -4.0, 40: 2.5, 77: 1.5}),
    "min_tokens_6": dict(min_tokens=6),
    "min_tokens_10": dict(min_tokens=10),
    "all": dict(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5, logit_bias={5: 2.0, 40: -1.0},
                min_tokens=8),
}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def setup(request):
    loaded = tiny_loaded(request.param, lora_rank=4)
    loaded.model.has_lora = False
    prompts = random_prompts(8, loaded.config.vocab_size)
    # the stop token of the min_tokens cases: the one plain greedy emits most early on, so that
    # holding it off changes the output and releasing it can end a request inside a block
    plain = [naive_greedy(loaded.model, p, 8) for p in prompts]
    stop = Counter(t for o in plain for t in o).most_common(1)[0][0]
    return loaded, prompts, stop


def _params(case: str, stop: int) -> SamplingParams:
    kw = dict(CASES[case])
    if "min_tokens" in kw:
        kw["stop_token_ids"] = [stop]
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, **kw)


def _oracle(ref):
    def drafter(req, proposed, nxt):
        return (ref[tuple(req.prompt_token_ids)][nxt:] + proposed)[: len(proposed)]
    return drafter


def _repeat(ref):
    def drafter(req, proposed, nxt):
        r = ref[tuple(req.prompt_token_ids)]
        return [r[nxt] if nxt < len(r) else proposed[0]] * len(proposed)
    return drafter


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_isd_with_processors_equals_ar(setup, case):
    loaded, prompts, stop = setup
    params = _params(case, stop)
    ref_list = [naive_generate(loaded.model, p, params) for p in prompts]
    ref = {tuple(p): r for p, r in zip(prompts, ref_list)}
    if params.min_tokens:
        assert all(stop not in r[: params.min_tokens] for r in ref_list)
        assert any(len(r) < MAX_NEW for r in ref_list), "the stop token should end some request"
    runs = [
        ("ar", 1, False, None), ("isd", 4, False, None), ("isd", 4, True, None), ("risd", 4, False, None),
        ("isd", 4, False, _oracle(ref)), ("risd", 8, False, _oracle(ref)), ("isd", 4, False, _repeat(ref)),
        ("risd", 3, False, _repeat(ref)),
    ]
    for mode, stride, adaptive, drafter in runs:
        loaded.model.has_lora = mode == "risd"
        llm = LLM(loaded=loaded, mode=mode, stride=stride, adaptive_stride=adaptive, drafter=drafter,
                  kv_cache_tokens=8192, max_num_batched_tokens=512)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        loaded.model.has_lora = False
        what = f"{mode} N={stride} adaptive={adaptive} drafter={drafter and drafter.__qualname__.split('.')[0]}"
        assert got == ref_list, what
        st = llm.stats()
        if stride > 1 and not adaptive:
            assert st.draft_tokens > 0, what
        if drafter is not None and drafter.__qualname__.startswith("_oracle"):
            # every draft was the true token, so each verify row saw the right history and accepted
            # it; only drafts past a stop token (the block's tail) may be rejected
            stopped = sum(len(r) < MAX_NEW for r in ref_list)
            assert st.draft_tokens - st.accepted_tokens <= (stride - 2) * stopped, what


def test_mask_rows_are_processed_so_biased_drafts_are_accepted(setup):
    """A +100 logit_bias makes the biased token certain; the MASK rows' proposals are processed
    too, so they draft it and every draft is accepted (greedy and sampled)."""
    loaded, prompts, _ = setup
    for T in (0.0, 1.0):
        params = SamplingParams(temperature=T, max_tokens=13, ignore_eos=True, logit_bias={9: 100.0}, seed=3)
        llm = LLM(loaded=loaded, mode="isd", stride=4, adaptive_stride=False, kv_cache_tokens=8192)
        outs = llm.generate(prompts, params)
        assert all(o.token_ids == [9] * 13 for o in outs)
        st = llm.stats()
        assert st.acceptance_rate == 1.0 and st.tokens_per_forward == 13 / 4


def test_processed_requests_batched_with_plain_ones(setup):
    """Processing is row-local: a batch mixing requests with and without processors gives each
    what it gets alone (greedy), and the plain ones what they get with no processor in the batch."""
    loaded, prompts, stop = setup
    plain = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    mixed = [_params("all", stop) if i % 2 else plain for i in range(len(prompts))]
    llm = LLM(loaded=loaded, mode="isd", stride=4, kv_cache_tokens=8192)
    together = [o.token_ids for o in llm.generate(prompts, mixed)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, mixed)]
    assert together == alone
    assert together[::2] == [o.token_ids for o in llm.generate(prompts[::2], plain)]
