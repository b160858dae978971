"""An independent AR oracle for the logits processors: one row at a time, plain loops over the
history (never the engine's batched code), dense full recomputation of the model (no paged KV).

`process_row(logits, prompt, history, params, eos)` applies vLLM's order: logit_bias -> min_tokens
ban -> repetition / frequency / presence penalties -> min_p (on logits / T, sampled rows only).
`naive_generate` is greedy AR with it, stopping as the engine stops (EOS / stop ids).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from workers import SamplingParams


def stop_set(params: SamplingParams, eos: list[int]) -> set[int]:
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))


def process_row(logits: torch.Tensor, prompt: list[int], history: list[int], params: SamplingParams,
                eos: list[int] = ()) -> torch.Tensor:
    """logits [V] of the token at output index len(history) -> processed logits [V] (float32)."""
    x = logits.float().clone()
    for t, b in (params.logit_bias or {}).items():
        x[t] += b
    if len(history) < params.min_tokens:
        for t in stop_set(params, list(eos)):
            x[t] = float("-inf")
    rp = params.repetition_penalty
    if rp != 1.0:
        for t in set(prompt) | set(history):
            x[t] = x[t] / rp if x[t] > 0 else x[t] * rp
    for t, c in Counter(history).items():
        x[t] = x[t] - params.frequency_penalty * c - params.presence_penalty
    if params.min_p > 0 and params.temperature > 0:
        s = x / params.temperature
        x[s < s.max() + math.log(params.min_p)] = float("-inf")
    return x


@torch.no_grad()
def dense_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] logits of a dense causal forward (row t predicts token t + 1)."""
    h = model(torch.tensor(ids)[None], torch.arange(len(ids))[None])
    return model.compute_logits(h[0]).float()


@torch.no_grad()
def naive_generate(model, prompt: list[int], params: SamplingParams, eos: list[int] = ()) -> list[int]:
    """Greedy AR with the processors, by full recomputation."""
    out: list[int] = []
    stops = stop_set(params, list(eos))
    while len(out) < params.max_tokens:
        row = dense_logits(model, prompt + out)[-1]
        t = int(process_row(row, prompt, out, params, eos).argmax())
        out.append(t)
        if t in stops:
            break
    return out
