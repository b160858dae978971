"""Stats arithmetic pinned on drafters with known acceptance (test-only drafter hook)."""

import pytest

from tests.tiny import random_prompts, tiny_loaded
from workers import LLM, SamplingParams


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("qwen3", seed=3)


@pytest.mark.parametrize("N", [2, 4, 8])
def test_oracle_drafter_gives_full_acceptance(loaded, N):
    prompts = random_prompts(4, loaded.config.vocab_size, seed=5)
    j = 5
    max_tokens = 1 + N * j
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ar = LLM(loaded=loaded, mode="ar").generate(prompts, params)
    cont = {tuple(o.prompt_token_ids): o.token_ids for o in ar}

    def oracle(req, proposed, next_index):
        c = cont[tuple(req.prompt_token_ids)]
        return c[next_index : next_index + len(proposed)]

    # A fixed stride: the counts below are for N-token rounds (the adaptive policy may pick less).
    llm = LLM(loaded=loaded, mode="isd", stride=N, drafter=oracle, adaptive_stride=False)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ar]
    st = llm.stats()
    assert st.acceptance_rate == 1.0
    assert st.draft_tokens == len(prompts) * (N - 1) * j
    assert st.rounds == {"cold": len(prompts), "verify_accept": len(prompts) * j, "verify_reject": 0}
    # Every verify round commits N tokens; the first (prefill) forward commits 1.
    for o in outs:
        assert o.metrics.num_forwards == 1 + j
        assert o.metrics.tokens_per_forward == pytest.approx((1 + N * j) / (1 + j))
    verify_tpf = (st.generation_tokens - len(prompts)) / (st.decode_forwards - len(prompts))
    assert verify_tpf == N
    assert st.accepted_per_pos == [len(prompts) * j] * (N - 1)


def test_wrong_drafter_gives_zero_acceptance(loaded):
    V = loaded.config.vocab_size
    prompts = random_prompts(4, V, seed=6)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ar = LLM(loaded=loaded, mode="ar").generate(prompts, params)
    cont = {tuple(o.prompt_token_ids): o.token_ids for o in ar}

    def wrong(req, proposed, next_index):
        c = cont[tuple(req.prompt_token_ids)]
        return [(t + 1) % V for t in c[next_index : next_index + len(proposed)]]

    # fixed stride: the adaptive policy would soon (timing-dependently) stop drafting for a drafter
    # that is never accepted, and this test is about the drafted rounds' counters
    llm = LLM(loaded=loaded, mode="isd", stride=4, drafter=wrong, adaptive_stride=False)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ar]
    st = llm.stats()
    assert st.draft_tokens > 0 and st.accepted_tokens == 0 and st.acceptance_rate == 0.0
    assert st.rounds["verify_accept"] == 0
    assert st.tokens_per_forward == 1.0
