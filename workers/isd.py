"""Introspective strided decoding (ISD): verification of last round's drafts and proposal of new
ones, for every request that got logits this step (DESIGN §1).

Owns: `ISDDecoder`. For a final item with k drafts and m MASK rows the logits come as
`[pending, d_0 .. d_{k-1}, M x m]`:
- rows 0..k-1 are the target p for d_0..d_{k-1}, row k is the bonus (clean) row;
- rows k+1..k+m propose the next drafts (conditioned on all drafts being right, so they are kept
  only when every draft was accepted; after a rejection the next round is a cold round).
With `num_groups` g = k+1 (`draft_anchors="every"`) the m MASK rows are g groups of m/g, group a
anchored at real row a (the pending token, then d_0 ..): it saw the block only up to that row, so
when a drafts are accepted (d_a rejected, or a = k), group a proposes the drafts that follow the
round's last token, and no cold round is needed. Its drafts are drawn from rows that never saw
the token committed after the anchor (as a cold round's are), so verifying them is still exact.
A cold round is k = 0 (the last prefill chunk is one: it carries the first MASK rows).
AR mode is k = m = 0 throughout.

Verification and sampling go through `kernels` (Triton on CUDA, the torch reference elsewhere),
with each request's own temperature / top-k / top-p / seed, so every emitted token is distributed
exactly as AR sampling (and greedy ISD equals greedy AR token for token).

Requests with logits processors (penalties, `logit_bias`, `min_tokens`, `min_p`) have their target
rows processed with the history each row assumes, and their MASK rows processed (position by
position, each seeing the drafts drawn before it) before the drafts are drawn; the processed MASK
rows are the stored q (`workers.logits_processors`). Logprobs come from the target row of each
emitted token (`workers.logprobs`).

Constrained requests (`structured_outputs`) get their verify rows masked by their matcher after
the drafts before each row, and their MASK rows masked likewise before the drafts are drawn
(`workers.grammar_masks`, which says why this is exact for every temperature).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

import idlm_kernels
from idlm_kernels import SamplingMetadata
from idlm_kernels.rng import PURPOSE_DRAFT
from workers import grammar_masks as gm
from workers import logprobs as lp
from workers.logits_processors import LogitsProcessors, any_processors, apply
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
    logprobs: list[lp.TokenLogprob] | None = None
    """One entry per token of `tokens` when the request asked for logprobs."""

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
        eos_token_ids: list[int] | None = None,
        logprobs_mode: lp.LogprobsMode = "raw_logprobs",
        mask_token_id: int | None = None,
        grammar_drafts: Literal["masked", "unmasked"] = "masked",
    ) -> None:
        self.vocab_size = vocab_size
        self.draft_mode = draft_mode
        self.drafter = drafter
        self.processors = LogitsProcessors(vocab_size, eos_token_ids or [])
        self.logprobs_mode = logprobs_mode
        self.mask_token_id = mask_token_id
        self.grammar_drafts = grammar_drafts
        """`masked`: a constrained request's drafts are drawn from its grammar-masked MASK rows
        (higher acceptance); `unmasked`: from the raw rows (no CPU work; off-grammar drafts are
        then rejected by verification). Both exact."""
        self.mask_times: deque[float] = deque(maxlen=4096)
        """Seconds spent building and applying grammar masks, per step that had any."""
        self.mask_log: list | None = None
        """Test hook: when a list, every verify mask is logged as (request, drafts, bitmask rows)."""

    def _metadata(self, reqs: list[Request], device) -> SamplingMetadata:
        return SamplingMetadata(
            temperature=torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=device),
            top_k=torch.tensor([r.params.top_k for r in reqs], dtype=torch.long, device=device),
            top_p=torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=device),
            key=torch.tensor([r.rng_key for r in reqs], dtype=torch.long, device=device),
            step=torch.tensor([r.rng_step for r in reqs], dtype=torch.long, device=device),
        )

    def _verified_drafts(self, finals: list[tuple[ScheduledItem, int]]) -> list[int]:
        """How many of each request's drafts this round verifies (all of them: off-grammar drafts
        are rejected by verification itself, which is what keeps sampled ISD exact)."""
        return [it.num_drafts for it, _ in finals]

    def _grammar_masks(self, finals, nv: list[int], t_off: list[int], target: torch.Tensor) -> None:
        """Masks every constrained request's verify rows: row j by the matcher after d_<j."""
        chains = [(it.request.grammar, t_off[i], it.request.drafts[: nv[i]])
                  for i, (it, _) in enumerate(finals) if it.request.grammar is not None]
        if not chains:
            return
        t0 = time.perf_counter()
        bm, rows = gm.verify_masks(chains, target.shape[0], target.shape[1], self.mask_token_id)
        if self.mask_log is not None:
            for g, first, drafts in chains:
                req = next(it.request for it, _ in finals if it.request.grammar is g)
                self.mask_log.append((req.request_id, list(req.output_token_ids), list(drafts),
                                      bm[first : first + len(drafts) + 1].clone()))
        gm.apply_masks(target, bm, rows)
        self.mask_times.append(time.perf_counter() - t0)

    def process(self, sched: SchedulerOutput, out: RunnerOutput) -> list[RoundResult]:
        finals = [(it, off) for it, off in zip(sched.items, out.row_offsets) if it.final]
        if not finals:
            return []
        logits = out.logits  # [R, V]
        dev, V = logits.device, logits.shape[1]
        reqs = [it.request for it, _ in finals]
        meta = self._metadata(reqs, dev)
        nv = self._verified_drafts(finals)
        target_idx: list[int] = []
        t_off: list[int] = []  # first row of each request in `target`
        for (_, off), k in zip(finals, nv):
            t_off.append(len(target_idx))
            target_idx += range(off, off + k + 1)
        target = logits.index_select(0, torch.tensor(target_idx, dtype=torch.long, device=dev))  # [sum(k+1), V]
        self._grammar_masks(finals, nv, t_off, target)
        want_lp = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        proc = None
        if any_processors(reqs):
            # verify row j of a request sees its output + the drafts before row j
            proc = self.processors.prepare(
                [(it.request, t_off[i] + j, it.request.drafts[:j]) for i, (it, _) in enumerate(finals)
                 for j in range(nv[i] + 1)], dev)
        lp_src, lp_off = target, t_off
        if proc is not None:
            if want_lp and self.logprobs_mode == "raw_logprobs":
                # raw logprobs: keep the unprocessed rows of the requests that asked for them
                lp_off, keep = {}, []
                for i in want_lp:
                    lp_off[i] = len(keep)
                    keep += range(t_off[i], t_off[i] + nv[i] + 1)
                lp_src = target.index_select(0, torch.tensor(keep, dtype=torch.long, device=dev))
            apply(target, proc)
        draft_ids = torch.tensor([d for (it, _), k in zip(finals, nv) for d in it.request.drafts[:k]],
                                 dtype=torch.long, device=dev)
        draft_logits = None
        if sum(nv) and not meta.all_greedy:
            rows = []
            for (it, _), k in zip(finals, nv):
                r = it.request
                if k == 0:
                    continue
                # Greedy requests never read q; zeros keep the flat layout aligned.
                rows.append(r.draft_logits[:k] if r.draft_logits is not None else torch.zeros(k, V, device=dev))
            draft_logits = torch.cat(rows)  # [sum(k), V]
        tokens, num_out = idlm_kernels.verify(target, draft_logits, draft_ids, nv, meta)
        tokens, num_out = tokens.tolist(), num_out.tolist()

        results = []
        # (item, first MASK row of the proposing group, next output index, round tokens, its rows)
        propose: list[tuple[ScheduledItem, int, int, list[int], int]] = []
        for i, (it, off) in enumerate(finals):
            n = num_out[i]
            res = RoundResult(item=it, tokens=tokens[i][:n], num_drafts=it.num_drafts, num_accepted=n - 1)
            res.accepted = [j < n - 1 for j in range(it.num_drafts)]
            results.append(res)
            g = it.num_groups
            if it.num_masks > 0 and (g > 1 or res.num_accepted == it.num_drafts):
                # the group anchored at the last accepted row (the only group when g = 1)
                size = it.num_masks // g
                first = off + it.num_drafts + 1 + (res.num_accepted * size if g > 1 else 0)
                next_index = it.request.num_output_tokens + n
                propose.append((it, first, next_index, res.tokens, size))
            else:
                it.request.clear_drafts()
        if want_lp:
            self._logprobs(want_lp, results, lp_off, lp_src, meta)
        self._propose(propose, logits, meta, {id(r): i for i, r in enumerate(reqs)})
        for r in reqs:
            r.rng_step += 1
        return results

    def _logprobs(self, want: list[int], results: list[RoundResult], t_off, src: torch.Tensor,
                  meta: SamplingMetadata) -> None:
        """Entries of every emitted token from its own target row of `src` (raw or processed logits;
        request i's rows start at `t_off[i]`)."""
        rows, toks, ks, req_of_row = [], [], [], []
        for i in want:
            res = results[i]
            rows += range(t_off[i], t_off[i] + len(res.tokens))
            toks += res.tokens
            ks += [res.item.request.params.logprobs] * len(res.tokens)
            req_of_row += [i] * len(res.tokens)
        dev = src.device
        x = src.index_select(0, torch.tensor(rows, dtype=torch.long, device=dev))
        if self.logprobs_mode == "raw_logprobs":
            logp = lp.raw(x)
        else:
            m = meta.rows(torch.tensor(req_of_row, dtype=torch.long, device=dev))
            logp = lp.processed(x, m.temperature, m.top_k, m.top_p)
        entries = lp.gather(logp, torch.tensor(toks, dtype=torch.long, device=dev), ks)
        pos = 0
        for i in want:
            n = len(results[i].tokens)
            results[i].logprobs, pos = entries[pos : pos + n], pos + n

    def _draw(self, rows: torch.Tensor, ri: torch.Tensor, stream: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if self.draft_mode == "argmax":
            return rows.argmax(-1)
        return idlm_kernels.sample(rows, ri, stream, meta, PURPOSE_DRAFT)

    def _propose(self, propose, logits: torch.Tensor, meta: SamplingMetadata, req_pos: dict[int, int]) -> None:
        """New drafts from the MASK rows of requests whose drafts were all accepted, or (several
        groups) from the group verification kept."""
        if not propose:
            return
        dev, V = logits.device, logits.shape[1]
        rows, req_index, stream = [], [], []
        for it, first, _, _, m in propose:
            rows += range(first, first + m)
            req_index += [req_pos[id(it.request)]] * m
            stream += range(m)
        mask_logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=dev))  # [M, V]
        ri = torch.tensor(req_index, dtype=torch.long, device=dev)
        st = torch.tensor(stream, dtype=torch.long, device=dev)
        masker = None
        if self.grammar_drafts == "masked" and any(it.request.grammar is not None for it, *_ in propose):
            entries, pos = [], 0
            for it, _, _, toks, m in propose:
                if it.request.grammar is not None:
                    entries.append((it.request.grammar, pos, toks, m))
                pos += m
            masker = gm.DraftMasker(entries, V, self.mask_token_id) or None
        if masker is not None or any_processors([it.request for it, *_ in propose]):
            proposed = self._draw_positional(propose, mask_logits, ri, st, meta, masker)
        else:
            proposed = self._draw(mask_logits, ri, st, meta).tolist()
        pos = 0
        for it, _, next_index, _, m in propose:
            req = it.request
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

    def _draw_positional(self, propose, mask_logits: torch.Tensor, ri: torch.Tensor, st: torch.Tensor,
                         meta: SamplingMetadata, masker: gm.DraftMasker | None) -> list[int]:
        """Drafts position by position: MASK row i of a request is masked by its grammar and
        processed with the history it assumes (output + this round's tokens + the drafts drawn at
        rows < i), in place, then drawn; the rows are left as drawn from (they become q)."""
        dev = mask_logits.device
        starts, pos = [], 0
        for *_, m in propose:
            starts.append(pos)
            pos += m
        proposed = [0] * pos
        try:
            for i in range(max(m for *_, m in propose)):
                live = [(it, s, toks) for (it, _, _, toks, m), s in zip(propose, starts) if m > i]
                if masker is not None:
                    t0 = time.perf_counter()
                    bm, rows = masker.fill(i, mask_logits.shape[0])
                    gm.apply_masks(mask_logits, bm, rows)
                    self.mask_times.append(time.perf_counter() - t0)
                b = self.processors.prepare([(it.request, s + i, toks + proposed[s : s + i]) for it, s, toks in live], dev)
                if b is not None:
                    apply(mask_logits, b)
                sel = [s + i for _, s, _ in live]
                idx = torch.tensor(sel, dtype=torch.long, device=dev)
                for r, t in zip(sel, self._draw(mask_logits[idx], ri[idx], st[idx], meta).tolist()):
                    proposed[r] = t
                if masker is not None:
                    masker.advance(i, {r: proposed[r] for r in sel})
        finally:
            if masker is not None:
                masker.end()
        return proposed
