"""Logprobs under ISD (workers.logprobs): every emitted token's entry equals a teacher-forced dense AR
recompute (fp32, 1e-5), whichever row produced it (accepted draft, correction, bonus, cold start,
first token); raw by default also with processors on; the processed mode equals the oracle's
processed distribution; prompt logprobs across chunked prefill; `n` fan-out."""

import pytest
import torch

from idlm_kernels import processed_probs
from tests.sampling_oracle import dense_logits, process_row
from tests.tiny import random_prompts, tiny_loaded
from workers import LLM, SamplingParams

TOL = 1e-5
K = 5


@pytest.fixture(scope="module")
def loaded():
    m = tiny_loaded("qwen3", vocab_size=96, seed=4, std=0.2, lora_rank=4)
    m.model.has_lora = False
    return m


def _check_against_recompute(model, prompt, out, mode_fn=None):
    """out.logprobs against log_softmax of the dense logits at the rows that predict out.token_ids."""
    rows = dense_logits(model, prompt + out.token_ids)[len(prompt) - 1 : len(prompt) - 1 + len(out.token_ids)]
    assert len(out.logprobs) == len(out.token_ids)
    for j, (tok, e) in enumerate(zip(out.token_ids, out.logprobs)):
        ref = torch.log_softmax(rows[j], -1) if mode_fn is None else mode_fn(rows[j], out.token_ids[:j])
        assert abs(e.logprob - float(ref[tok])) <= TOL, (j, e.logprob, float(ref[tok]))
        assert len(e.top_ids) == K and e.top_logprobs == sorted(e.top_logprobs, reverse=True)
        assert torch.allclose(torch.tensor(e.top_logprobs), ref[torch.tensor(e.top_ids)], atol=TOL, rtol=0)
        assert abs(e.top_logprobs[0] - float(ref.max())) <= TOL
        if tok in e.top_ids:  # the token's value and its entry come from one tensor: bit-equal
            assert e.top_logprobs[e.top_ids.index(tok)] == e.logprob


@pytest.mark.parametrize("mode,T,processors", [
    ("isd", 1.0, {}), ("isd", 0.0, {}), ("risd", 1.0, {}),
    ("isd", 1.0, dict(repetition_penalty=1.3, presence_penalty=0.4, logit_bias={3: 2.0}, min_p=0.02)),
])
def test_isd_logprobs_equal_teacher_forced_recompute(loaded, mode, T, processors):
    prompts = random_prompts(12, loaded.config.vocab_size, seed=3)
    loaded.model.has_lora = mode == "risd"
    llm = LLM(loaded=loaded, mode=mode, stride=4, adaptive_stride=False, kv_cache_tokens=8192)
    params = [SamplingParams(temperature=T, max_tokens=20, ignore_eos=True, seed=s, logprobs=K, **processors)
              for s in range(len(prompts))]
    outs = llm.generate(prompts, params)
    loaded.model.has_lora = False
    st = llm.stats()
    # every kind of emitted token occurred: first token + cold starts, accepted drafts, corrections, bonus
    assert st.rounds["cold"] > len(prompts) and st.accepted_tokens > 0 and st.rounds["verify_accept"] > 0
    assert T == 0 or st.rounds["verify_reject"] > 0
    for p, o in zip(prompts, outs):
        _check_against_recompute(loaded.model, p, o)


def test_processed_logprobs_mode(loaded):
    """`logprobs_mode=processed_logprobs`: the log of the distribution sampled from (processors with
    the row's history, temperature, top-k), -inf outside the kept set; greedy: processors only."""
    prompts = random_prompts(6, loaded.config.vocab_size, seed=5)
    llm = LLM(loaded=loaded, mode="isd", stride=4, adaptive_stride=False, kv_cache_tokens=8192,
              logprobs_mode="processed_logprobs")
    for T, top_k in ((0.8, 7), (0.0, -1)):
        params = SamplingParams(temperature=T, top_k=top_k, max_tokens=16, ignore_eos=True, seed=1, logprobs=K,
                                repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={3: 1.0})
        for p, o in zip(prompts, llm.generate(prompts, params)):
            _check_against_recompute(loaded.model, p, o, lambda row, h, p=p, sp=params: _processed_ref(row, h, p, sp))


def _processed_ref(row, history, prompt, sp: SamplingParams) -> torch.Tensor:
    x = process_row(row, prompt, history, sp)
    if sp.temperature == 0:
        return torch.log_softmax(x, -1)
    T = torch.tensor([sp.temperature])
    kept = processed_probs(x[None], T, torch.tensor([sp.top_k]), torch.tensor([sp.top_p]))[0] > 0
    return torch.log_softmax(torch.where(kept, x / sp.temperature, torch.tensor(float("-inf"))), -1)


def test_prompt_logprobs_across_prefill_chunks(loaded):
    """A 16-token budget splits the prompts into chunks (and mixes them with decode blocks); the
    prompt entries equal the dense recompute, first entry None, one per prompt token; requests
    without prompt_logprobs in the same batch get none."""
    prompts = random_prompts(4, loaded.config.vocab_size, lo=30, hi=60, seed=9)
    llm = LLM(loaded=loaded, mode="isd", stride=4, kv_cache_tokens=8192, max_num_batched_tokens=16)
    params = [SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=3, logprobs=0) if i != 1 else
              SamplingParams(temperature=0, max_tokens=6) for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    assert outs[1].prompt_logprobs is None and outs[1].logprobs is None
    for i, (p, o) in enumerate(zip(prompts, outs)):
        if i == 1:
            continue
        assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
        ref = torch.log_softmax(dense_logits(loaded.model, p), -1)
        for t in range(1, len(p)):
            e = o.prompt_logprobs[t]
            assert abs(e.logprob - float(ref[t - 1, p[t]])) <= TOL
            assert torch.allclose(torch.tensor(e.top_logprobs), ref[t - 1, torch.tensor(e.top_ids)], atol=TOL, rtol=0)
            assert len(e.top_ids) == 3
        assert all(e.top_ids == [] for e in o.logprobs)  # logprobs=0: the token's value only


def test_prompt_logprobs_after_a_prefix_cache_hit(loaded):
    """The prompt is cached by an earlier request; a request asking for prompt logprobs computes its
    whole prompt anyway (no hit may skip the rows that give them) and gets the dense recompute's
    entries, while a plain repeat of the prompt does hit the cache."""
    p = random_prompts(1, loaded.config.vocab_size, lo=50, hi=51, seed=11)[0]
    llm = LLM(loaded=loaded, mode="isd", stride=4, kv_cache_tokens=8192, enable_prefix_caching=True)
    first = llm.generate([p], SamplingParams(temperature=0, max_tokens=4))[0]
    again = llm.generate([p], SamplingParams(temperature=0, max_tokens=4))[0]
    assert again.num_cached_tokens >= 32 and again.token_ids == first.token_ids
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2))[0]
    assert o.num_cached_tokens == 0 and o.token_ids == first.token_ids
    ref = torch.log_softmax(dense_logits(loaded.model, p), -1)
    assert len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
    for t in range(1, len(p)):
        assert abs(o.prompt_logprobs[t].logprob - float(ref[t - 1, p[t]])) <= TOL


def test_n_fans_out_into_independent_seeded_samples(loaded):
    prompt = random_prompts(1, loaded.config.vocab_size, seed=2)[0]
    # fixed stride: a sampled output depends on the seed and the stride schedule, which the
    # adaptive policy chooses by load (a batch of 6 vs 1)
    llm = LLM(loaded=loaded, mode="isd", stride=4, adaptive_stride=False, kv_cache_tokens=8192)
    sp = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=40, n=3)
    outs = llm.generate([prompt, prompt], sp)
    assert [o.index for o in outs] == [0, 1, 2, 0, 1, 2]
    singles = [llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=40 + i))[0]
               for i in range(3)]
    assert [o.token_ids for o in outs[:3]] == [o.token_ids for o in singles] == [o.token_ids for o in outs[3:]]
    assert len({tuple(o.token_ids) for o in singles}) > 1
    unseeded = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, n=4))
    assert len({tuple(o.token_ids) for o in unseeded}) > 1
