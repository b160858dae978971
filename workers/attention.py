"""Causal attention of a ragged flat batch against each request's paged KV cache (CPU/torch path).

Owns: `AttentionMetadata` (built once per step by the model runner, shared by all layers) and
`paged_attention` (write this step's K/V into the cache slots, then attend every query row to its
request's cached prefix plus the causal part of its own new rows).

Queries of all requests are gathered into one padded batch so each layer runs one SDPA call;
requests with long query chunks (prefill) run alone so one long prompt does not pad every decode
block to its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Query chunks longer than this are attended one request at a time (see module docstring).
_SOLO_Q_LEN = 64


@dataclass
class _Group:
    q_index: torch.Tensor  # [B, Lq] row of each query in the flat batch (padded with 0)
    kv_slots: torch.Tensor  # [B, Lk] cache slot of each key position (padded with 0)
    mask: torch.Tensor  # [B, 1, Lq, Lk] True where attention is allowed
    out_index: torch.Tensor  # [n_valid] flat positions in [B*Lq] that are real queries
    out_rows: torch.Tensor  # [n_valid] their rows in the flat batch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot where each new token's K/V is written
    groups: list[_Group]
    num_tokens: int

    @classmethod
    def build(
        cls,
        q_lens: list[int],
        ctx_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """q_lens[i] new rows of request i follow its ctx_lens[i] cached tokens."""
        slots_all: list[torch.Tensor] = []
        starts = []
        pos = 0
        for q_len, ctx, table in zip(q_lens, ctx_lens, block_tables):
            n = ctx + q_len
            p = torch.arange(n)
            bt = torch.tensor(table, dtype=torch.long)
            slots_all.append(bt[p // block_size] * block_size + p % block_size)
            starts.append(pos)
            pos += q_len
        slot_mapping = torch.cat([s[c:] for s, c in zip(slots_all, ctx_lens)]) if q_lens else torch.zeros(0, dtype=torch.long)
        solo = [i for i, q in enumerate(q_lens) if q > _SOLO_Q_LEN]
        packed = [i for i, q in enumerate(q_lens) if q <= _SOLO_Q_LEN]
        groups = [cls._group([i], q_lens, ctx_lens, starts, slots_all, device) for i in solo]
        if packed:
            groups.append(cls._group(packed, q_lens, ctx_lens, starts, slots_all, device))
        return cls(slot_mapping=slot_mapping.to(device), groups=groups, num_tokens=pos)

    @staticmethod
    def _group(idx, q_lens, ctx_lens, starts, slots_all, device) -> _Group:
        B = len(idx)
        Lq = max(q_lens[i] for i in idx)
        Lk = max(ctx_lens[i] + q_lens[i] for i in idx)
        q_index = torch.zeros(B, Lq, dtype=torch.long)
        kv_slots = torch.zeros(B, Lk, dtype=torch.long)
        mask = torch.zeros(B, Lq, Lk, dtype=torch.bool)
        valid = torch.zeros(B, Lq, dtype=torch.bool)
        for b, i in enumerate(idx):
            q, c = q_lens[i], ctx_lens[i]
            q_index[b, :q] = torch.arange(starts[i], starts[i] + q)
            kv_slots[b, : c + q] = slots_all[i]
            # query j sits at absolute position c + j and sees keys 0..c+j (strict causal).
            qpos = c + torch.arange(q)
            mask[b, :q, : c + q] = torch.arange(c + q)[None, :] <= qpos[:, None]
            # Padded query rows attend key 0 only so softmax stays finite; their output is dropped.
            mask[b, q:, 0] = True
            valid[b, :q] = True
        flat_valid = valid.reshape(-1)
        out_index = flat_valid.nonzero().squeeze(1)
        return _Group(
            q_index=q_index.to(device),
            kv_slots=kv_slots.to(device),
            mask=mask[:, None].to(device),
            out_index=out_index.to(device),
            out_rows=q_index.reshape(-1)[out_index].to(device),
        )


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    out = torch.empty_like(q)
    Hq, D = q.shape[1], q.shape[2]
    for g in meta.groups:
        B, Lq = g.q_index.shape
        qb = q[g.q_index].transpose(1, 2)  # [B, Hq, Lq, D]
        kb = k_cache[g.kv_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, Lk, D]
        vb = v_cache[g.kv_slots].transpose(1, 2).to(q.dtype)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=g.mask, scale=scale, enable_gqa=kb.shape[1] != Hq)
        ob = ob.transpose(1, 2).reshape(B * Lq, Hq, D)  # [B*Lq, Hq, D]
        out[g.out_rows] = ob[g.out_index]
    return out


def dense_attention(
    q: torch.Tensor,  # [B, L, Hq, D]
    k: torch.Tensor,  # [B, L, Hkv, D]
    v: torch.Tensor,  # [B, L, Hkv, D]
    mask: torch.Tensor | None,  # [B, L, L] bool (True = attend) or None for plain causal
    scale: float,
) -> torch.Tensor:  # [B, L, Hq, D]
    """No-cache attention for training and reference checks (custom masks, e.g. I-DLM's block mask)."""
    qb, kb, vb = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kb.shape[1] != qb.shape[1]
    if mask is None:
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)
