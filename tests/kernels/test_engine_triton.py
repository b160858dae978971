"""The engine's greedy and sampled exactness tests, with and without logits processors, with the
Triton path forced on (`IDLM_KERNELS=triton`, CPU interpreter, small vocabulary)."""

import pytest

from tests.tiny import naive_greedy, random_prompts, tiny_loaded
from tests.workers import test_sampling_exactness as sampled
from workers import LLM, SamplingParams


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("IDLM_KERNELS", "triton")


@pytest.mark.parametrize("family,mode,stride", [("qwen3", "isd", 4), ("llama", "isd", 3), ("llama", "risd", 4)])
def test_greedy_isd_equals_ar_with_triton(family, mode, stride):
    loaded = tiny_loaded(family, vocab_size=96, lora_rank=4 if mode == "risd" else 0)
    loaded.model.has_lora = False
    prompts = random_prompts(6, 96, seed=4)
    ref = [naive_greedy(loaded.model, p, 16) for p in prompts]
    loaded.model.has_lora = mode == "risd"
    # fixed stride: whether the adaptive policy drafts on a random model depends on timings
    llm = LLM(loaded=loaded, mode=mode, stride=stride, adaptive_stride=False)
    out = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    assert out == ref
    assert llm.stats().draft_tokens > 0


def test_sampled_isd_matches_exact_ar_law_with_triton(monkeypatch):
    monkeypatch.setattr(sampled, "N_E2E", 1500, raising=False)
    sampled.test_isd_end_to_end_matches_exact_ar_law(1.0, -1, 1.0, check_ar=False)


def test_greedy_isd_with_processors_equals_ar_with_triton():
    """Processed target and MASK rows (-inf entries from bans and min_p included) through the
    Triton verify / sample kernels: greedy ISD with every processor equals the AR oracle."""
    from tests.sampling_oracle import naive_generate

    loaded = tiny_loaded("qwen3", vocab_size=96)
    prompts = random_prompts(6, 96, seed=4)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5,
                            presence_penalty=0.5, logit_bias={5: 2.0, 40: -3.0}, min_tokens=6, stop_token_ids=[7])
    ref = [naive_generate(loaded.model, p, params) for p in prompts]
    llm = LLM(loaded=loaded, mode="isd", stride=4, adaptive_stride=False)
    assert [o.token_ids for o in llm.generate(prompts, params)] == ref
    assert llm.stats().draft_tokens > 0


def test_sampled_isd_with_processors_follows_ar_law_with_triton(monkeypatch):
    from tests.workers import test_processors_sampling as processed

    monkeypatch.setattr(processed, "N_SAMPLES", 1500)
    processed.test_sampled_isd_with_processors_follows_the_exact_ar_law("penalties+min_p+logit_bias")
