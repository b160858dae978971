"""The engine's greedy and sampled exactness tests with the Triton path forced on
(`IDLM_KERNELS=triton`, CPU interpreter, small vocabulary)."""

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
    llm = LLM(loaded=loaded, mode=mode, stride=stride)
    out = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    assert out == ref
    assert llm.stats().draft_tokens > 0


def test_sampled_isd_matches_exact_ar_law_with_triton(monkeypatch):
    monkeypatch.setattr(sampled, "N_E2E", 1500, raising=False)
    sampled.test_isd_end_to_end_matches_exact_ar_law(1.0, -1, 1.0, check_ar=False)
