"""The Triton kernel path of the engine's attention (CUDA by default; `IDLM_ATTENTION=triton` forces
it, on CPU under the Triton interpreter): device-side metadata and the per-layer call.

Owns: `StepShape` (everything about a step that is static in a CUDA graph: the key of a captured
graph), `pack_step` (one int32 host tensor per step: the only host-to-device copy of the step's
inputs) and `KernelMetadata` (built from that tensor with tensor ops on the device, no host sync and
no per-request Python; `build` runs inside a captured graph as well as eagerly).

Per layer, `KernelMetadata.attend`: `idlm_kernels.write_kv` (this step's K/V into their slots; padding
rows have slot -1), then `idlm_kernels.paged_attention`. The runner's flat batch puts every MASK row last
(`workers.batch_layout`), so a request's rows are not contiguous there, while the kernel contract
wants each request's rows together (`query_start_loc`). We gather q into request order before the
kernel and scatter the output back: one `index_select` each way per layer, [T, Hq, D] rows only
(at C=32 with 7-row ISD blocks, 224 x 4096 bf16 = 1.8 MB each way per layer, against the
weights' ~440 MB per layer), and none at all when the flat batch already is in request order (AR
steps, prefill without MASK rows). The alternative, request-order rows on CUDA, would make the
gated LoRA gather and scatter its MASK rows in every projection instead (seven per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

import idlm_kernels
from idlm_kernels.paged_attention import default_num_splits
from workers.batch_layout import StepBatch, flat_rows, request_rows

_PER_REQUEST = 5  # ctx, c_real, m_real, c_slot, m_slot


@dataclass(frozen=True)
class StepShape:
    """The static part of a step (a graph key): sizes and the attention launch choices."""

    num_requests: int  # B (dummy requests included)
    num_rows: int  # T
    width: int  # W: block-table columns
    num_clean: int  # first flat row of the MASK region (the gated LoRA's slice)
    in_request_order: bool  # the flat batch is in request order: no row gathers
    max_query_len: int
    max_seq_len: int  # bound used for the split-KV choice
    num_splits: int

    @property
    def packed_size(self) -> int:
        return _PER_REQUEST * self.num_requests + self.num_rows + self.num_requests * self.width

    @classmethod
    def of(cls, batch: StepBatch, width: int, num_kv_heads: int, device, max_seq_len: int | None = None) -> StepShape:
        """`max_seq_len` None: the batch's own (eager); a graph passes the model's limit so that its
        split-KV choice holds for any context length."""
        q = [c + m for c, m in zip(batch.c_slot, batch.m_slot)]
        max_q = max(q, default=0)
        if max_seq_len is None:
            max_seq_len = max((a + b for a, b in zip(batch.ctx, q)), default=0)
        B = batch.num_requests
        return cls(B, batch.num_rows, width, batch.num_clean, batch.in_request_order, max_q, max_seq_len,
                   default_num_splits(B, num_kv_heads, max_q, max_seq_len, device))


def pack_step(batch: StepBatch, width: int) -> torch.Tensor:
    """[5B + T + B*W + R] int32 on the host: per-request ints, flat token ids, the block tables padded
    to `width` columns with block 0, then the request-order rows that need logits. A constant
    number of tensor ops whatever B is."""
    B = batch.num_requests
    head = torch.tensor(batch.ctx + batch.c_real + batch.m_real + batch.c_slot + batch.m_slot + batch.ids,
                        dtype=torch.int32)
    lens = torch.tensor([len(t) for t in batch.tables], dtype=torch.long)  # [B]
    tables = torch.zeros(B, width, dtype=torch.int32)
    tables[torch.arange(width)[None, :] < lens[:, None]] = torch.tensor(list(chain.from_iterable(batch.tables)),
                                                                         dtype=torch.int32)
    return torch.cat([head, tables.view(-1), torch.tensor(batch.logit_rows, dtype=torch.int32)])


@dataclass
class KernelMetadata:
    block_tables: torch.Tensor  # [B, W] int32
    seq_lens: torch.Tensor  # [B] int32: cached + new rows (padding included)
    query_start_loc: torch.Tensor  # [B+1] int32: request-order row offsets
    slot_mapping: torch.Tensor  # [T] int64, flat order; -1 for padding rows
    positions: torch.Tensor  # [T] int64, flat order
    q_index: torch.Tensor | None  # [T] flat row of each request-order row (None: identity)
    out_index: torch.Tensor | None  # [T] request-order row of each flat row (None: identity)
    shape: StepShape
    block_size: int

    @classmethod
    def build(cls, packed: torch.Tensor, shape: StepShape, block_size: int) -> tuple[KernelMetadata, torch.Tensor]:
        """From `pack_step`'s tensor on the device -> (metadata, flat input ids [T] int64)."""
        B, T, W = shape.num_requests, shape.num_rows, shape.width
        per = packed[: _PER_REQUEST * B].view(_PER_REQUEST, B).long()
        ctx, c_real, m_real, c_slot, m_slot = per
        ids = packed[_PER_REQUEST * B : _PER_REQUEST * B + T].long()
        bt = packed[_PER_REQUEST * B + T : shape.packed_size].view(B, W)
        ql = c_slot + m_slot
        rid, j, pos, slot = request_rows(ql, ctx, bt, block_size, T)
        slot = torch.where(j < (c_real + m_real)[rid], slot, -1)  # padding rows write no KV
        qsl = torch.zeros(B + 1, dtype=torch.int32, device=packed.device)
        qsl[1:] = torch.cumsum(ql, 0)
        q_index = out_index = None
        if not shape.in_request_order:
            q_index = flat_rows(rid, j, c_real, m_real, c_slot, m_slot, shape.num_clean)
            out_index = torch.empty_like(q_index).scatter_(0, q_index, torch.arange(T, device=packed.device))
            pos, slot = pos[out_index], slot[out_index]
        meta = cls(bt, (ctx + ql).int(), qsl, slot, pos, q_index, out_index, shape, block_size)
        return meta, ids

    def attend(self, q, k, v, k_cache, v_cache, scale: float) -> torch.Tensor:
        """q [T, Hq, D], k, v [T, Hkv, D] in flat order -> [T, Hq, D] in flat order."""
        idlm_kernels.write_kv(k, v, k_cache, v_cache, self.slot_mapping)
        if self.q_index is not None:
            q = q.index_select(0, self.q_index)
        s = self.shape
        o = idlm_kernels.paged_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                                    self.block_size, scale, max_query_len=s.max_query_len,
                                    max_seq_len=s.max_seq_len, num_splits=s.num_splits)
        return o if self.out_index is None else o.index_select(0, self.out_index)
