"""Row layout of one step's ragged flat batch: where each request's rows sit, at which absolute
positions, and which KV slots they write.

Owns: `StepBatch` (the host-side lists of one step) and `build_step_batch` (from the scheduled
items, padded or not), `request_index`, `request_rows` and
`flat_rows`: tensor ops over all requests at once, on any device, with no host sync (so the CUDA
path can run them inside a captured graph). Both attention paths use them: the SDPA gather path
(`workers.attention`) and the Triton kernel path (`workers.kernel_attention`).

Layout. Request b has `ctx[b]` cached tokens and feeds `c_real[b]` clean rows (real tokens, then
drafts) and `m_real[b]` MASK rows, in causal order: "request order". In the flat batch the clean
rows of all requests come first, request after request, and every MASK row after them, so the
gated LoRA of R-ISD applies to one slice. A CUDA-graph step pads: request b then occupies
`c_slot[b] >= c_real[b]` clean and `m_slot[b] >= m_real[b]` MASK rows; its padding rows take the
positions after its real rows (so no real row attends to them) and write no KV (slot -1). Dummy
requests (`c_real = m_real = 0`) pad the batch to a captured size. Eager steps have no padding
(`c_slot = c_real`, `m_slot = m_real`).

MASK groups (`draft_anchors="every"`): an item's MASK rows may be `groups` groups, one per real row
from the pending token on (positions and masks: `workers.attention`). All of them get logits, in
the step's one head product: on the CPU a second product for the one group verification keeps
re-reads the head's weight and costs more than the extra rows (3.4 ms against 2.7 ms for 4 rows
and 5.4 ms for 16 on SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepBatch:
    """One forward as host lists (per request unless noted). Built by the model runner."""

    ids: list[int] = field(default_factory=list)  # [T] flat token ids: clean region, then MASK region
    ctx: list[int] = field(default_factory=list)
    c_real: list[int] = field(default_factory=list)
    m_real: list[int] = field(default_factory=list)
    c_slot: list[int] = field(default_factory=list)
    m_slot: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # MASK groups of each request (workers.attention)
    tables: list[list[int]] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)  # request-order rows whose logits are needed
    logit_offsets: list[int] = field(default_factory=list)  # per item: its first row in the logits (-1: none)
    prompt_rows: list[int] = field(default_factory=list)  # request-order rows whose hidden states go back
    prompt_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (item, first prompt position, count)

    @property
    def num_requests(self) -> int:
        return len(self.ctx)

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def num_clean(self) -> int:
        return sum(self.c_slot)

    @property
    def in_request_order(self) -> bool:
        """True when the flat batch already is in request order (no MASK rows, or one request
        without padding): attention then needs no row gathers."""
        if not any(self.m_slot):
            return True
        return self.num_requests == 1 and self.c_slot == self.c_real and self.m_slot == self.m_real


def build_step_batch(items, mask_token_id: int | None, pad: tuple[int, int, int] | None = None) -> StepBatch:
    """The step's rows from its scheduled items (`workers.scheduler.ScheduledItem`): every item feeds
    `all_token_ids[num_computed:]` (num_real tokens) and, when final, its drafts and MASK rows.
    `pad` = (bucket, c, m): lay every request out at c clean and m MASK rows and add dummy requests
    up to `bucket` (decode steps only: see `workers.cuda_graphs.graph_padding`); padding rows carry
    token 0 in the clean region and MASK in the MASK region."""
    b = StepBatch()
    ro = 0  # first request-order row of the current request
    for i, it in enumerate(items):
        req = it.request
        if req.needs_prompt_logits:
            # rows at positions p < prompt_len - 1 predict prompt token p + 1
            start = max(req.num_computed, len(req.prompt_logprobs or ()))
            end = min(req.num_computed + it.num_real, req.num_prompt_tokens - 1)
            if end > start:
                b.prompt_spans.append((i, start, end - start))
                b.prompt_rows += range(ro + start - req.num_computed, ro + end - req.num_computed)
        clean = req.token_slice(req.num_computed, req.num_computed + it.num_real)
        m, g = 0, 1
        if it.final:
            clean += req.drafts[: it.num_drafts]
            m, g = it.num_masks, it.num_groups
            # `pending` is the last real row; it and every later real row need logits.
            b.logit_offsets.append(len(b.logit_rows))
            b.logit_rows += range(ro + it.num_real - 1, ro + len(clean) + m)
        else:
            b.logit_offsets.append(-1)
        cs, ms = (pad[1], pad[2]) if pad else (len(clean), m)
        b.ids += clean
        if cs > len(clean):
            b.ids += [0] * (cs - len(clean))
        b.ctx.append(req.num_computed)
        b.c_real.append(len(clean))
        b.m_real.append(m)
        b.c_slot.append(cs)
        b.m_slot.append(ms)
        b.groups.append(g)
        b.tables.append(req.block_table)
        ro += cs + ms
    if pad:
        extra = pad[0] - len(items)
        b.ids += [0] * (pad[1] * extra)
        b.ctx += [0] * extra
        b.c_real += [0] * extra
        b.m_real += [0] * extra
        b.c_slot += [pad[1]] * extra
        b.m_slot += [pad[2]] * extra
        b.groups += [1] * extra
        b.tables += [[]] * extra
    n_mask = sum(b.m_slot)
    if n_mask:
        b.ids += [mask_token_id] * n_mask
    return b


def request_index(ql: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ql [B] int64 rows per request -> (request of each request-order row [T], index inside it [T])."""
    ends = torch.cumsum(ql, 0)
    r = torch.arange(num_rows, device=ql.device)
    rid = torch.searchsorted(ends, r, right=True)  # sync-free, unlike repeat_interleave without output_size
    return rid, r - (ends - ql)[rid]


def request_rows(
    ql: torch.Tensor,  # [B] int64 rows of each request (padding included)
    ctx: torch.Tensor,  # [B] int64 cached tokens
    tables: torch.Tensor,  # [B, W] block ids
    block_size: int,
    num_rows: int,  # T = ql.sum(), known on the host
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per request-order row: (request [T], index inside its request [T], absolute position [T],
    cache slot [T]); the slot of a position past the table's width uses its last column."""
    rid, j = request_index(ql, num_rows)
    pos = ctx[rid] + j
    col = (pos // block_size).clamp(max=tables.shape[1] - 1)
    slot = tables[rid, col].long() * block_size + pos % block_size
    return rid, j, pos, slot


def flat_rows(
    rid: torch.Tensor,  # [T] request of each request-order row
    j: torch.Tensor,  # [T] index inside the request
    c_real: torch.Tensor,  # [B] int64
    m_real: torch.Tensor,  # [B]
    c_slot: torch.Tensor,  # [B]
    m_slot: torch.Tensor,  # [B]
    num_clean: int,  # sum(c_slot): first flat row of the MASK region
) -> torch.Tensor:  # [T] flat row of each request-order row
    """Request order is [real clean, real MASK, padding clean, padding MASK]; each request's clean
    rows sit in the clean region (its real rows first), its MASK rows in the MASK region."""
    clean0 = (torch.cumsum(c_slot, 0) - c_slot)[rid]
    mask0 = num_clean + (torch.cumsum(m_slot, 0) - m_slot)[rid]
    cr, mr, cs = c_real[rid], m_real[rid], c_slot[rid]
    return torch.where(j < cr, clean0 + j,
                       torch.where(j < cr + mr, mask0 + j - cr,
                                   torch.where(j < cs + mr, clean0 + j - mr, mask0 + j - cs)))
