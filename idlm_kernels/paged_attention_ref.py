"""Plain-torch reference of ragged paged attention and of the KV write: it defines the semantics
that `idlm_kernels/paged_attention.py` (Triton) must reproduce.

Owns: `paged_attention_ref`, `write_kv_ref` and `check_paged_inputs` (the shape/dtype contract both
implementations assert before doing anything).

Layout (vLLM's vocabulary):
- `q` `[T, Hq, D]`: the new query rows of B requests, request b's rows contiguous at
  `query_start_loc[b] .. query_start_loc[b+1]`, in causal order.
- `k_cache` / `v_cache` `[num_slots, Hkv, D]`, slot-major: slot = block id * block_size + offset.
- `block_tables` `[B, max_blocks]` int32: request b's key position p lives in slot
  `block_tables[b, p // block_size] * block_size + p % block_size`.
- `seq_lens` `[B]` int32 = cached tokens + new rows of each request (the new rows' K/V are already in
  the cache: `write_kv` runs first).
- Query row i of request b (q_len_b rows) sits at absolute position `seq_lens[b] - q_len_b + i` and
  attends keys `0 .. that position` (bottom-right aligned causal mask). That is exactly ISD's block
  `[pending, drafts, MASK x (N-1)]` after the cached prefix, a prefill chunk after the prefix cached so
  far, or one AR row.
- GQA: query head h uses KV head `h // (Hq // Hkv)` (as `repeat_interleave`, HF's layout).

`write_kv_ref` copies row t of k / v into slot `slot_mapping[t]`; a negative slot is skipped (the
padding rows of a CUDA-graph batch).

The reference loops over requests on purpose (clarity over speed: it is the oracle of the tests,
and the engine's CPU path uses the batched SDPA gather of `workers.attention` instead).
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size) -> None:
    """Asserts the contract of `paged_attention` (raises ValueError naming the argument)."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q: expected q [T, Hq, D] and caches [slots, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[2] != k_cache.shape[2] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q: head_dim must match and Hq must be a multiple of Hkv, got q {tuple(q.shape)}, "
                         f"cache {tuple(k_cache.shape)}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q: q and the caches must share one of {_DTYPES}, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    B = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != B or query_start_loc.shape != (B + 1,):
        raise ValueError(f"block_tables: expected block_tables [B, W], seq_lens [B], query_start_loc [B+1], got "
                         f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, {tuple(query_start_loc.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: must be int32, got {t.dtype}")
    if k_cache.shape[0] % block_size:
        raise ValueError(f"block_size: cache slots ({k_cache.shape[0]}) must be a multiple of block_size ({block_size})")


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    block_size: int,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [T, Hq, D], `out_dtype` (default q's); computed in fp32
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size)
    qpk = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    tables = block_tables.long()
    for b, L in enumerate(lens):
        qs, qe = starts[b], starts[b + 1]
        if qe == qs:
            continue
        pos = torch.arange(L, device=q.device)  # [L] key positions
        slots = tables[b, pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].float().repeat_interleave(qpk, dim=1)  # [L, Hq, D]
        v = v_cache[slots].float().repeat_interleave(qpk, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), k) * scale  # [Hq, q_len, L]
        q_pos = L - (qe - qs) + torch.arange(qe - qs, device=q.device)  # [q_len] absolute positions
        s = s.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(out.dtype)
    return out


def write_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64, -1 = skip
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v[keep].to(v_cache.dtype))
