"""Sampled ISD with logits processors is distributed exactly as AR sampling with them: the joint
law of the first three tokens (the 2nd and 3rd come through verified drafts, N=4) against the exact
AR law enumerated with the independent oracle of tests/sampling_oracle.py, chi-square as in
test_sampling_exactness.py. Penalties make each row's law depend on the drafts before it, `min_p`
and `logit_bias` change the support, `min_tokens` bans a token on the first rows only."""

import pytest
import torch

from idlm_kernels import processed_probs
from tests.sampling_oracle import process_row
from tests.tiny import tiny_loaded
from tests.workers.test_sampling_exactness import P_MIN, _chi2
from workers import LLM, SamplingParams

V = 10  # the MASK token is V - 1 and the model may emit it like any other token
PROMPT = [1, 4, 2, 7]
N_SAMPLES = 3000
CASES = {
    "penalties+min_p+logit_bias": dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.8,
                                       repetition_penalty=1.4, min_p=0.08, logit_bias={2: 1.5, 6: -2.0}),
    "top_k+penalties+min_tokens": dict(temperature=0.8, top_k=6, repetition_penalty=0.7, frequency_penalty=-0.6,
                                       min_tokens=3, stop_token_ids=[3], logit_bias={5: 0.7}),
}


@torch.no_grad()
def exact_ar_joint(model, prompt, params: SamplingParams, depth: int = 3) -> torch.Tensor:
    """P(t1..t_depth | prompt) of AR sampling with the processors, by enumerating every prefix."""
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = [[]]
    one = torch.ones(1)
    for _ in range(depth):
        ids = torch.tensor([prompt + pre for pre in prefixes])
        h = model(ids, torch.arange(ids.shape[1]).expand_as(ids))
        last = model.compute_logits(h[:, -1]).float()
        rows = torch.stack([process_row(last[i], prompt, pre, params) for i, pre in enumerate(prefixes)])
        n = len(prefixes)
        probs = processed_probs(rows, (one * params.temperature).expand(n), (one.long() * params.top_k).expand(n),
                                (one * params.top_p).expand(n))
        joint = (joint[:, None] * probs.double()).reshape(-1)
        prefixes = [pre + [v] for pre in prefixes for v in range(V)]
    return joint  # index = t1 * V^2 + t2 * V + t3


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_isd_with_processors_follows_the_exact_ar_law(case):
    loaded = tiny_loaded("qwen3", vocab_size=V, seed=21, std=0.25, lora_rank=0)
    params = [SamplingParams(max_tokens=4, ignore_eos=True, seed=s, **CASES[case]) for s in range(N_SAMPLES)]
    exact = exact_ar_joint(loaded.model, PROMPT, params[0])
    llm = LLM(loaded=loaded, mode="isd", stride=4, adaptive_stride=False, max_num_seqs=512,
              max_num_batched_tokens=4096, kv_cache_tokens=65536)
    outs = llm.generate([PROMPT] * N_SAMPLES, params)
    st = llm.stats()
    assert st.rounds["verify_accept"] + st.rounds["verify_reject"] >= N_SAMPLES  # tokens 2-3 came through verification
    assert st.accepted_tokens > N_SAMPLES // 2
    idx = torch.tensor([o.token_ids[0] * V * V + o.token_ids[1] * V + o.token_ids[2] for o in outs])
    counts = torch.bincount(idx, minlength=V**3).float()
    assert bool((exact[counts > 0] > 0).all()), "a token the processors exclude was emitted"
    assert _chi2(counts, exact.float()) > P_MIN
    # the processors matter here: the same samples reject the law without them (the test has power)
    plain = SamplingParams(max_tokens=4, temperature=params[0].temperature, top_k=params[0].top_k)
    assert _chi2(counts, exact_ar_joint(loaded.model, PROMPT, plain).float()) < 1e-6
