"""Per-row logits processing of a step: `logit_bias`, the `min_tokens` ban, repetition / frequency /
presence penalties and `min_p`, as batched tensor ops on the rows that need them (DESIGN §1).

Owns: `LogitsProcessors` (the per-step batch builder) and `PenaltyState` (the tokens a request has
seen with their output counts, brought up to date incrementally). Penalties are sparse: they touch
only the (row, seen token) pairs, so their cost grows with the history, not with the vocabulary.

Why it is exact under ISD. Every processed row is described by its request and the tokens that
precede it beyond the committed output (`extra`): a verify row j sees `output + d_<j`, a MASK row i
(which proposes the next round's draft i) sees `output + this round's tokens + d'_<i`. A row is
processed exactly as AR would process the distribution of the token at output index
`len(output) + len(extra)` if everything before it had been emitted, so greedy ISD equals greedy
AR and the verified target rows are the AR law with the same processors. The MASK rows' processed
logits are what their drafts are sampled from and are stored as q, so verification stays the one
speculative-sampling rule of `kernels`.

Order (vLLM's, one order for every row): grammar mask (`workers.grammar_masks`) -> logit_bias -> min_tokens -> penalties -> min_p; the kernels
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
    """The tokens a request has seen (its prompt and output, each once) with their output counts.
    Penalties touch only these, so they cost O(seen tokens) per row, not O(V)."""

    def __init__(self, req: Request) -> None:
        self.ids = list(dict.fromkeys(req.prompt_token_ids))
        self.pos = {t: i for i, t in enumerate(self.ids)}
        self.counts = [0] * len(self.ids)
        self.num_counted = 0
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def sync(self, output_ids: list[int]) -> None:
        """Adds the output tokens committed since the last call (a few per step)."""
        for t in output_ids[self.num_counted:]:
            i = self.pos.get(t)
            if i is None:
                self.pos[t] = len(self.ids)
                self.ids.append(t)
                self.counts.append(1)
            else:
                self.counts[i] += 1
            self._tensors = None
        self.num_counted = len(output_ids)

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [T] int64, output counts [T] float32), rebuilt only after new tokens."""
        if self._tensors is None:
            self._tensors = (torch.tensor(self.ids, dtype=torch.long, device=device),
                             torch.tensor(self.counts, dtype=torch.float32, device=device))
        return self._tensors


@dataclass
class ProcessorBatch:
    """Index and parameter tensors of one `apply` (rows are rows of the logits tensor given to it)."""

    bias_idx: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tokens) [L]
    bias_val: torch.Tensor | None = None  # [L] float32
    ban_idx: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tokens) [S]
    # penalties, one entry per (row, seen token) pair: a row's seen tokens are its request's prompt
    # and output tokens plus the tokens before the row (`extra`)
    pen_rows: torch.Tensor | None = None  # [P]
    pen_tokens: torch.Tensor | None = None  # [P]
    pen_counts: torch.Tensor | None = None  # [P] float32: occurrences in output + extra
    presence: torch.Tensor | None = None  # [P]
    frequency: torch.Tensor | None = None  # [P]
    repetition: torch.Tensor | None = None  # [P]
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

    @staticmethod
    def _state(req: Request) -> PenaltyState:
        st = req.penalty_state
        if st is None:
            st = req.penalty_state = PenaltyState(req)
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
        tok_parts, cnt_parts, lens, params = [], [], [], []
        offset = 0  # of the current row's first pair
        known: list[int] = []  # flat pairs whose count an extra token raises
        new: dict[tuple[int, int], int] = {}  # (row, token) of extra tokens the request had not seen
        for req, row, extra in pen:
            st = self._state(req)
            ids, counts = st.tensors(device)
            for t in extra:
                i = st.pos.get(t)
                if i is not None:
                    known.append(offset + i)
                else:
                    new[(row, t)] = new.get((row, t), 0) + 1
            tok_parts.append(ids)
            cnt_parts.append(counts)
            lens.append(len(st.ids))
            offset += len(st.ids)
            p = req.params
            params.append((row, p.presence_penalty, p.frequency_penalty, p.repetition_penalty))
        # one op for every pair's row and parameters (row ids are exact in float32)
        pair = torch.repeat_interleave(lt(params, torch.float32), lt(lens), dim=0)  # [P, 4]
        tokens, counts = torch.cat(tok_parts), torch.cat(cnt_parts)  # new tensors: safe to modify
        if known:
            counts.index_add_(0, lt(known), torch.ones(len(known), device=device))
        if new:
            of_row = {r[0]: r for r in params}
            pair = torch.cat([pair, lt([of_row[r] for r, _ in new], torch.float32)])
            tokens = torch.cat([tokens, lt([t for _, t in new])])
            counts = torch.cat([counts, lt(list(new.values()), torch.float32)])
        b.pen_rows, b.pen_tokens, b.pen_counts = pair[:, 0].long(), tokens, counts
        b.presence, b.frequency, b.repetition = pair[:, 1], pair[:, 2], pair[:, 3]


def apply(logits: torch.Tensor, b: ProcessorBatch) -> torch.Tensor:
    """Processes the rows of `logits` [R, V] float32 in place (and returns it)."""
    if b.bias_idx is not None:
        logits.index_put_(b.bias_idx, b.bias_val, accumulate=True)
    if b.ban_idx is not None:
        saved = logits[b.ban_idx]  # [S]
        logits.index_put_(b.ban_idx, torch.tensor(float("-inf"), device=logits.device))
        # A grammar that allows only stop tokens here would leave nothing: such a row keeps its
        # stop logits (vLLM's rule; row-local, so AR and every ISD row agree).
        dead = (logits[b.ban_idx[0]] == float("-inf")).all(-1)  # [S]
        if bool(dead.any()):
            logits[b.ban_idx[0][dead], b.ban_idx[1][dead]] = saved[dead]
    if b.pen_rows is not None:
        idx = (b.pen_rows, b.pen_tokens)
        x = logits[idx]  # [P]: every seen token of every penalised row (prompt or history)
        x = torch.where(x > 0, x / b.repetition, x * b.repetition)
        logits[idx] = x - b.frequency * b.pen_counts - b.presence * (b.pen_counts > 0).float()
    if b.minp_rows is not None:
        x = logits[b.minp_rows]  # [Rm, V]
        s = x / b.temperature
        keep = s >= s.amax(-1, keepdim=True) + b.log_min_p
        logits[b.minp_rows] = torch.where(keep, x, torch.full_like(x, float("-inf")))
    return logits
