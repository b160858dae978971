"""The sampling API on the real demo model (SmolLM2-135M-Instruct + the shipped R-ISD adapter):
greedy R-ISD with each logits processor equals greedy AR with it, token for token; prompt (echo)
and generated-token logprobs equal HF transformers' `log_softmax` in fp32 (1e-4)."""

import pytest
import torch

from workers import LLM, SamplingParams
from workers.config import EngineConfig
from workers.engine import LoadedModel, load_engine_model

QUESTIONS = ["What is 2 plus 2?", "Name three colors.", "Why is the sky blue?"]
PROCESSORS = {
    "repetition_penalty": dict(repetition_penalty=1.3),
    "frequency_penalty": dict(frequency_penalty=0.8),
    "presence_penalty": dict(presence_penalty=1.0),
    "logit_bias": dict(logit_bias={28: 4.0, 253: 3.0, 30: -5.0}),
    "min_tokens": dict(min_tokens=16),
    "all": dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.3, logit_bias={28: 2.0}, min_tokens=16),
}


@pytest.fixture(scope="module")
def risd_loaded() -> LoadedModel:
    return load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=4))


@pytest.fixture(scope="module")
def engines(risd_loaded):
    # fixed stride: these tests check drafted tokens (processors, logprobs); whether the adaptive
    # policy drafts depends on measured step times (its exactness: test_adaptive_stride.py)
    risd = LLM(loaded=risd_loaded, mode="risd", stride=4, adaptive_stride=False, kv_cache_tokens=4096, max_num_seqs=8)
    prompts = [risd.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    return risd, prompts


def _ar(loaded: LoadedModel) -> LLM:
    loaded.model.has_lora = False
    return LLM(loaded=loaded, mode="ar", kv_cache_tokens=4096, max_num_seqs=8)


def test_greedy_risd_with_each_processor_equals_ar(risd_loaded, engines):
    risd, prompts = engines
    eos = risd.engine.output.eos_token_ids
    plain = SamplingParams(temperature=0, max_tokens=24)
    for name, kw in PROCESSORS.items():
        params = SamplingParams(temperature=0, max_tokens=24, **kw)
        ar = [o.token_ids for o in _ar(risd_loaded).generate(prompts, params)]
        risd_loaded.model.has_lora = True
        got = [o.token_ids for o in risd.generate(prompts, params)]
        assert got == ar, name
        if "min_tokens" in kw:
            assert all(len(o) >= kw["min_tokens"] and not eos & set(o[: kw["min_tokens"]]) for o in ar), name
    first = risd.generate(prompts[:1], plain)[0]
    assert len(first.token_ids) < PROCESSORS["min_tokens"]["min_tokens"]  # min_tokens held EOS off
    assert risd.stats().accepted_tokens > 0


def test_logprobs_equal_transformers(risd_loaded, engines, smollm2_dir, monkeypatch):
    """Echo-style prompt logprobs and the logprobs of R-ISD greedy tokens (accepted drafts among
    them) against HF's log_softmax on prompt + output. IDLM_CPU_GEMM=torch: our default oneDNN GEMM
    sums in another order than HF's, which moves SmolLM2's logits by ~1e-4 (test_loader)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("IDLM_CPU_GEMM", "torch")
    risd, prompts = engines
    risd_loaded.model.has_lora = True
    before = risd.stats().accepted_tokens
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    outs = risd.generate(prompts[:2], params)
    assert risd.stats().accepted_tokens > before  # some tokens came from accepted drafts
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()
    for p, o in zip(prompts[:2], outs):
        ids = p + o.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)  # [T, V]
        entries = o.prompt_logprobs[1:] + o.logprobs
        assert o.prompt_logprobs[0] is None and len(entries) == len(ids) - 1
        for t, e in enumerate(entries):
            assert abs(e.logprob - float(ref[t, ids[t + 1]])) <= 1e-4, (t, e.logprob, float(ref[t, ids[t + 1]]))
            assert torch.allclose(torch.tensor(e.top_logprobs), ref[t, torch.tensor(e.top_ids)], atol=1e-4, rtol=0)
        for t, e in enumerate(o.logprobs):  # greedy tokens are the top-1 entry, bit for bit
            assert e.top_logprobs[0] == e.logprob and e.top_ids[0] == o.token_ids[t]
