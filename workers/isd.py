"""Introspective strided decoding (ISD): verification of last round's drafts and proposal of new
ones, for every request that got logits this step (DESIGN §1).

Owns: `ISDDecoder`. For a final item with k drafts and m MASK rows the logits come as
`[pending, d_0 .. d_{k-1}, M x m]`:
- rows 0..k-1 are the target p for d_0..d_{k-1}, row k is the bonus (clean) row;
- rows k+1..k+m propose the next drafts (conditioned on all drafts being right, so they are kept
  only when every draft was accepted; after a rejection the next round is a cold round).
A cold round is k = 0 (the last prefill chunk is one: it carries the first MASK rows).
AR mode is k = m = 0 throughout.

Verification and sampling go through `kernels` (Triton on CUDA, the torch reference elsewhere),
with each request's own temperature / top-k / top-p / seed, so every emitted token is distributed
exactly as AR sampling (and greedy ISD equals greedy AR token for token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

import kernels
from kernels import SamplingMetadata
from kernels.rng import PURPOSE_DRAFT
from workers.model_runner import RunnerOutput
from workers.request import Request
from workers.scheduler import ScheduledItem, SchedulerOutput

# A test hook: replaces the drafts proposed for a request (they are then treated as one-hot q).
# Called as drafter(request, proposed_drafts, output_index_of_first_draft) -> drafts.
Drafter = Callable[[Request, list[int], int], list[int]]


@dataclass
class RoundResult:
    item: ScheduledItem
    tokens: list[int]
    """Committed tokens of this round, before stop handling: accepted drafts + recovered/bonus."""
    num_drafts: int
    num_accepted: int
    accepted: list[bool] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.num_drafts == 0:
            return "cold"
        return "verify_accept" if self.num_accepted == self.num_drafts else "verify_reject"


def _onehot_logits(tokens: list[int], vocab: int, device) -> torch.Tensor:
    out = torch.full((len(tokens), vocab), float("-inf"), device=device)
    out[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 0.0
    return out


class ISDDecoder:
    def __init__(
        self,
        vocab_size: int,
        draft_mode: Literal["sample", "argmax"] = "sample",
        drafter: Drafter | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.draft_mode = draft_mode
        self.drafter = drafter

    def _metadata(self, reqs: list[Request], device) -> SamplingMetadata:
        return SamplingMetadata(
            temperature=torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=device),
            top_k=torch.tensor([r.params.top_k for r in reqs], dtype=torch.long, device=device),
            top_p=torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=device),
            key=torch.tensor([r.rng_key for r in reqs], dtype=torch.long, device=device),
            step=torch.tensor([r.rng_step for r in reqs], dtype=torch.long, device=device),
        )

    def process(self, sched: SchedulerOutput, out: RunnerOutput) -> list[RoundResult]:
        finals = [(it, off) for it, off in zip(sched.items, out.row_offsets) if it.final]
        if not finals:
            return []
        logits = out.logits  # [R, V]
        dev, V = logits.device, logits.shape[1]
        reqs = [it.request for it, _ in finals]
        meta = self._metadata(reqs, dev)
        num_drafts = [it.num_drafts for it, _ in finals]
        target_idx: list[int] = []
        for it, off in finals:
            target_idx += range(off, off + it.num_drafts + 1)
        target = logits.index_select(0, torch.tensor(target_idx, dtype=torch.long, device=dev))  # [sum(k+1), V]
        draft_ids = torch.tensor([d for it, _ in finals for d in it.request.drafts[: it.num_drafts]], dtype=torch.long, device=dev)
        draft_logits = None
        if sum(num_drafts) and not meta.all_greedy:
            rows = []
            for it, _ in finals:
                r = it.request
                if it.num_drafts == 0:
                    continue
                # Greedy requests never read q; zeros keep the flat layout aligned.
                rows.append(r.draft_logits[: it.num_drafts] if r.draft_logits is not None else torch.zeros(it.num_drafts, V, device=dev))
            draft_logits = torch.cat(rows)  # [sum(k), V]
        tokens, num_out = kernels.verify(target, draft_logits, draft_ids, num_drafts, meta)
        tokens, num_out = tokens.tolist(), num_out.tolist()

        results = []
        propose: list[tuple[int, ScheduledItem, int, int]] = []  # (result idx, item, first mask row, next out idx)
        for i, (it, off) in enumerate(finals):
            n = num_out[i]
            res = RoundResult(item=it, tokens=tokens[i][:n], num_drafts=it.num_drafts, num_accepted=n - 1)
            res.accepted = [j < n - 1 for j in range(it.num_drafts)]
            results.append(res)
            if res.num_accepted == it.num_drafts and it.num_masks > 0:
                next_index = it.request.num_output_tokens + n
                propose.append((i, it, off + it.num_drafts + 1, next_index))
            else:
                it.request.clear_drafts()
        self._propose(propose, logits, meta)
        for r in reqs:
            r.rng_step += 1
        return results

    def _propose(self, propose, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        """New drafts from the MASK rows of requests whose drafts were all accepted."""
        if not propose:
            return
        dev, V = logits.device, logits.shape[1]
        rows, req_index, stream = [], [], []
        for i, it, first, _ in propose:
            rows += range(first, first + it.num_masks)
            req_index += [i] * it.num_masks
            stream += range(it.num_masks)
        mask_logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=dev))  # [M, V]
        ri = torch.tensor(req_index, dtype=torch.long, device=dev)
        if self.draft_mode == "argmax":
            proposed = mask_logits.argmax(-1)
        else:
            proposed = kernels.sample(mask_logits, ri, torch.tensor(stream, dtype=torch.long, device=dev), meta, PURPOSE_DRAFT)
        proposed = proposed.tolist()
        pos = 0
        for _, it, _, next_index in propose:
            req, m = it.request, it.num_masks
            drafts = proposed[pos : pos + m]
            q_logits = mask_logits[pos : pos + m]
            pos += m
            onehot = self.draft_mode == "argmax"
            if self.drafter is not None:
                drafts = list(self.drafter(req, drafts, next_index))[:m]
                onehot = True
            req.drafts = drafts
            if req.params.greedy:
                req.draft_logits = None
            elif onehot:
                req.draft_logits = _onehot_logits(drafts, V, dev)
            else:
                req.draft_logits = q_logits.clone()
