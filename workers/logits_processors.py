"""Per-row logits processing of a step: `logit_bias`, the `min_tokens` ban, repetition / frequency /
presence penalties and `min_p`, as batched tensor ops on the rows that need them (DESIGN §1).

Owns: `LogitsProcessors` (the per-step batch builder) and `PenaltyState` (a request's output-token
counts and prompt-token mask, kept on the device and brought up to date incrementally).

Why it is exact under ISD. Every processed row is described by its request and the tokens that
precede it beyond the committed output (`extra`): a verify row j sees `output + d_<j`, a MASK row i
(which proposes the next round's draft i) sees `output + this round's tokens + d'_<i`. A row is
processed exactly as AR would process the distribution of the token at output index
`len(output) + len(extra)` if everything before it had been emitted, so greedy ISD equals greedy
AR and the verified target rows are the AR law with the same processors. The MASK rows' processed
logits are what their drafts are sampled from and are stored as q, so verification stays the one
speculative-sampling rule of `kernels`.

Order (vLLM's, one order for every row): logit_bias -> min_tokens -> penalties -> min_p; the kernels
then apply temperature, top-k and top-p. `min_p` is applied on x = logits / T (keep x >= max x +
log min_p, i.e. p >= min_p * p_max), for sampled rows only (it never changes an argmax).

Hot path: `prepare` returns None when no request of the rows uses a processor; callers then skip
all of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.request import Request


class PenaltyState:
    """Counts of a request's output tokens ([V] int32) and the set of its prompt tokens ([V] bool)."""

    def __init__(self, req: Request, vocab_size: int, device: torch.device) -> None:
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.prompt_mask[torch.tensor(req.prompt_token_ids, dtype=torch.long, device=device)] = True
        self.num_counted = 0

    def sync(self, output_ids: list[int]) -> None:
        """Adds the output tokens committed since the last call (a few per step)."""
        new = output_ids[self.num_counted:]
        if new:
            idx = torch.tensor(new, dtype=torch.long, device=self.counts.device)
            self.counts.index_add_(0, idx, torch.ones(len(new), dtype=torch.int32, device=idx.device))
            self.num_counted = len(output_ids)


@dataclass
class ProcessorBatch:
    """Index and parameter tensors of one `apply` (rows are rows of the logits tensor given to it)."""

    bias_idx: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tokens) [L]
    bias_val: torch.Tensor | None = None  # [L] float32
    ban_idx: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tokens) [S]
    pen_rows: torch.Tensor | None = None  # [Rp]
    counts: torch.Tensor | None = None  # [Rp, V] float32: occurrences in output + extra
    prompt_mask: torch.Tensor | None = None  # [Rp, V] bool
    presence: torch.Tensor | None = None  # [Rp, 1]
    frequency: torch.Tensor | None = None  # [Rp, 1]
    repetition: torch.Tensor | None = None  # [Rp, 1]
    minp_rows: torch.Tensor | None = None  # [Rm]
    log_min_p: torch.Tensor | None = None  # [Rm, 1]
    temperature: torch.Tensor | None = None  # [Rm, 1]


def any_processors(reqs: list[Request]) -> bool:
    return any(r.params.has_processors for r in reqs)


class LogitsProcessors:
    def __init__(self, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))

    def stop_ids(self, req: Request) -> list[int]:
        """The tokens `min_tokens` holds off: EOS (unless ignore_eos) and `stop_token_ids`."""
        p = req.params
        ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            ids.update(self.eos_token_ids)
        return sorted(ids)

    def _state(self, req: Request, device) -> PenaltyState:
        st = req.penalty_state
        if st is None:
            st = req.penalty_state = PenaltyState(req, self.vocab_size, device)
        st.sync(req.output_token_ids)
        return st

    def prepare(self, rows: list[tuple[Request, int, list[int]]], device) -> ProcessorBatch | None:
        """`rows`: (request, row in the logits tensor, extra tokens before that row). Rows of
        requests without processors are ignored; None when none is left."""
        rows = [r for r in rows if r[0].params.has_processors]
        if not rows:
            return None
        b = ProcessorBatch()
        bias_r, bias_t, bias_v, ban_r, ban_t = [], [], [], [], []
        pen, minp = [], []
        for req, row, extra in rows:
            p = req.params
            if p.logit_bias:
                bias_r += [row] * len(p.logit_bias)
                bias_t += p.logit_bias.keys()
                bias_v += p.logit_bias.values()
            if req.num_output_tokens + len(extra) < p.min_tokens:
                stop = self.stop_ids(req)
                ban_r += [row] * len(stop)
                ban_t += stop
            if p.has_penalties:
                pen.append((req, row, extra))
            if p.min_p > 0.0 and p.temperature > 0.0:
                minp.append((row, p))

        def lt(x, dtype=torch.long):
            return torch.tensor(x, dtype=dtype, device=device)

        if bias_r:
            b.bias_idx, b.bias_val = (lt(bias_r), lt(bias_t)), lt(bias_v, torch.float32)
        if ban_r:
            b.ban_idx = (lt(ban_r), lt(ban_t))
        if pen:
            self._penalties(b, pen, device, lt)
        if minp:
            b.minp_rows = lt([r for r, _ in minp])
            b.log_min_p = lt([math.log(p.min_p) for _, p in minp], torch.float32)[:, None]
            b.temperature = lt([p.temperature for _, p in minp], torch.float32)[:, None]
        return b

    def _penalties(self, b: ProcessorBatch, pen, device, lt) -> None:
        states = [self._state(req, device) for req, _, _ in pen]
        counts = torch.stack([s.counts for s in states])  # [Rp, V] int32, committed output
        er = [i for i, (_, _, extra) in enumerate(pen) for _ in extra]
        if er:  # + the tokens between the committed output and the row (drafts, this round's tokens)
            et = [t for _, _, extra in pen for t in extra]
            counts.index_put_((lt(er), lt(et)), torch.ones(len(er), dtype=torch.int32, device=device), accumulate=True)
        b.pen_rows = lt([row for _, row, _ in pen])
        b.counts = counts.float()
        b.prompt_mask = torch.stack([s.prompt_mask for s in states])
        b.presence = lt([req.params.presence_penalty for req, _, _ in pen], torch.float32)[:, None]
        b.frequency = lt([req.params.frequency_penalty for req, _, _ in pen], torch.float32)[:, None]
        b.repetition = lt([req.params.repetition_penalty for req, _, _ in pen], torch.float32)[:, None]


def apply(logits: torch.Tensor, b: ProcessorBatch) -> torch.Tensor:
    """Processes the rows of `logits` [R, V] float32 in place (and returns it)."""
    if b.bias_idx is not None:
        logits.index_put_(b.bias_idx, b.bias_val, accumulate=True)
    if b.ban_idx is not None:
        logits.index_put_(b.ban_idx, torch.tensor(float("-inf"), device=logits.device))
    if b.pen_rows is not None:
        x = logits[b.pen_rows]  # [Rp, V]
        seen = b.counts > 0
        rep = seen | b.prompt_mask
        x = torch.where(rep, torch.where(x > 0, x / b.repetition, x * b.repetition), x)
        x = x - b.frequency * b.counts - b.presence * seen.float()
        logits[b.pen_rows] = x
    if b.minp_rows is not None:
        x = logits[b.minp_rows]  # [Rm, V]
        s = x / b.temperature
        keep = s >= s.amax(-1, keepdim=True) + b.log_min_p
        logits[b.minp_rows] = torch.where(keep, x, torch.full_like(x, float("-inf")))
    return logits
