"""Log-probabilities of emitted and prompt tokens (api-under-isd.md §4).

Owns: `TokenLogprob` (one token's value and its top alternatives: plain floats and ints), the
gathering of a token's value and top-k from one log-probability tensor, the processed mode, and
prompt logprobs from prefill hidden states.

Rules. Every emitted token's entry comes from the target row that produced it (accepted draft j ->
row j, correction at the rejecting row, bonus -> row k, cold-start and first token -> row 0 of their
block), never from q or the residual. Default values are the raw model log-probabilities
(`log_softmax` of the row's logits, vLLM's `raw_logprobs`); `processed_logprobs` takes them after
the request's processors, temperature and top-k / top-p (greedy rows: processors only, as vLLM).
The token's value and its top-k come from the same tensor, so a greedy token's value equals the
top-1 entry bit for bit (lm-eval's `is_greedy` check). Prompt logprobs are always raw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

from idlm_kernels.acceptance_ref import truncation_threshold

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
LOGPROBS_MODES: tuple[str, ...] = ("raw_logprobs", "processed_logprobs")
PROMPT_CHUNK_ROWS = 256
"""Prompt rows per lm_head product: bounds the [rows, V] temporaries of long prompts."""


class TokenLogprob(NamedTuple):
    logprob: float
    top_ids: list[int]
    """The most likely tokens of the row, most likely first (as many as the request asked for)."""
    top_logprobs: list[float]


def gather(logp: torch.Tensor, tokens: torch.Tensor, num_top: list[int]) -> list[TokenLogprob]:
    """logp [R, V] log-probabilities, tokens [R] -> one entry per row with its `num_top[r]` best."""
    if logp.shape[0] == 0:
        return []
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    k = min(max(num_top), logp.shape[1])
    if k == 0:
        return [TokenLogprob(c, [], []) for c in chosen]
    vals, ids = logp.topk(k, dim=-1)  # sorted, most likely first
    vals, ids = vals.tolist(), ids.tolist()
    return [TokenLogprob(c, i[:n], v[:n]) for c, i, v, n in zip(chosen, ids, vals, num_top)]


def raw(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def processed(
    logits: torch.Tensor,  # [R, V] processed logits (processors applied)
    temperature: torch.Tensor,  # [R]
    top_k: torch.Tensor,  # [R]
    top_p: torch.Tensor,  # [R]
) -> torch.Tensor:  # [R, V]
    """log of the distribution each row samples from: processed logits / T, truncated by top-k and
    top-p exactly as the kernels truncate (`truncation_threshold`); greedy rows at T = 1, untruncated."""
    sampled = temperature > 0
    t = torch.where(sampled, temperature, torch.ones_like(temperature)).float()
    x = logits.float() / t[:, None]
    rs = sampled.nonzero().squeeze(1)
    if rs.numel():
        thr = truncation_threshold(logits[rs], temperature[rs], top_k[rs], top_p[rs])
        x[rs] = torch.where(x[rs] >= thr[:, None], x[rs], torch.full_like(x[rs], float("-inf")))
    return torch.log_softmax(x, dim=-1)


def prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,  # [P, H] hidden states of prompt rows
    targets: list[int],  # [P] the prompt token each row predicts
    num_top: int,
) -> list[TokenLogprob]:
    out: list[TokenLogprob] = []
    tgt = torch.tensor(targets, dtype=torch.long, device=hidden.device)
    for s in range(0, hidden.shape[0], PROMPT_CHUNK_ROWS):
        e = min(s + PROMPT_CHUNK_ROWS, hidden.shape[0])
        out += gather(raw(compute_logits(hidden[s:e])), tgt[s:e], [num_top] * (e - s))
    return out
