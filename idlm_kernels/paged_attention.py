"""Triton ragged paged attention (prefill chunks and ISD blocks in one launch), its split-KV
(flash-decoding) variant with a merge kernel, and the KV-write kernel. `idlm_kernels/paged_attention_ref.py`
defines the semantics; tests compare the two (CPU: `TRITON_INTERPRET=1`, fp32/fp16; CUDA: bf16 too).

Owns: the launchers `paged_attention_triton` / `write_kv_triton`, the launch-shape heuristics
(`attention_config`, `default_num_splits`) and three kernels:
- `_attn_kernel`: grid `(T // BLOCK_Q + B, Hkv, S)`, from shapes only (no query length reaches the
  host, so the launch can be captured in a CUDA graph). Program (i, g, s) binary-searches
  `query_start_loc` for its request and q-block, loads the query rows of that block for every query
  head of KV head g (GQA packing: tile row m is query row `m // QPK`, head `g * QPK + m % QPK`, so
  each K/V tile is read once for the whole head group and the `tl.dot` M dimension is >= 16 even for
  one decode row), then runs an online softmax (fp32, exp2) over KV tiles gathered through the block
  table, only up to the block's causal limit. With S = 1 it writes the normalised output; with S > 1
  each program covers the S-th part of those tiles (the split computed in-kernel from the live
  `seq_lens`, so a captured graph adapts to any length) and writes its unnormalised accumulator and
  (max, sum) to fp32 scratch sized per query row (`[T, Hq, S, D]`: vLLM's per-sequence scratch
  breaks for q_len > 1, their #52879).
- `_merge_kernel`: grid `(T, Hq)`: rescales the S partial results by `exp2(m_s - max)` and
  divides by the combined sum. No atomics (the interpreter would hide races).
- `_write_kv_kernel`: grid `(cdiv(T, BLOCK_T),)`: copies rows of k / v into their slots, skipping
  negative slots (padding rows of a CUDA-graph batch).

Launch shapes (`attention_config`): decode/ISD blocks (max q_len <= 16) use BLOCK_Q = next power of
two of the longest block, so a 2N-1 = 7-row ISD block is one program per KV head and its K/V is read
once (vLLM's BLOCK_Q = 4 would read it twice); prefill uses BLOCK_M = 64 (BLOCK_Q = 64 // QPK).
TILE = 32 keys. Untuned: tune on the target GPU (bench/kernels.py).

Addresses are int64 (block ids are cast before multiplying), so caches over 2^31 elements work.
fp32 inputs use IEEE dots (`input_precision="ieee"`: no TF32 on GPU); fp16/bf16 multiply P (cast to
the value dtype) with V on the tensor cores and accumulate in fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from idlm_kernels.paged_attention_ref import check_paged_inputs

_LOG2E = 1.4426950408889634
TILE = 32
DECODE_MAX_Q = 16  # longest query block that takes the decode configuration
MAX_SPLITS = 16


@triton.jit
def _find_request(qsl_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    # The last request b with qsl[b] // BLOCK_Q + b <= pid (request b's q-blocks start there).
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs", "max_blocks"])  # one compile whatever the batch
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, acc_ptr, ml_ptr,
    qk_scale, num_seqs, max_blocks,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_bt,
    NUM_Q_HEADS: tl.constexpr, QPK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = _find_request(qsl_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + b)
    if q_block * BLOCK_Q >= q_len:
        return  # surplus program (the grid is an upper bound)
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # cached tokens before this request's first new row

    m = tl.arange(0, BLOCK_M)
    q_row = q_block * BLOCK_Q + m // QPK  # [BLOCK_M] row inside the request
    head = kvh * QPK + m % QPK  # [BLOCK_M] query head
    row_ok = (m < BLOCK_Q * QPK) & (q_row < q_len)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    tok = (q_start + q_row).to(tl.int64)  # [BLOCK_M] row in q / out
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_PAD]
    q_pos = ctx + q_row  # [BLOCK_M] absolute position: attends keys 0..q_pos

    # Keys this q-block can see: 0 .. ctx + its last row (the causal limit), in TILE_N tiles.
    kv_end = ctx + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    if NUM_SPLITS == 1:
        t_begin = 0
        t_end = num_tiles
    else:
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        t_begin = split * per_split
        t_end = tl.minimum(t_begin + per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for t in range(t_begin, t_end):
        kv = t * TILE_N + tl.arange(0, TILE_N)  # [TILE_N] key positions
        kv_ok = kv < kv_end
        blk_idx = kv // BLOCK_SIZE
        blk = tl.load(bt_row + blk_idx, mask=kv_ok & (blk_idx < max_blocks), other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + kv % BLOCK_SIZE  # [TILE_N]
        k = tl.load(k_ptr + slot[None, :] * stride_ks + kvh * stride_kh + d[:, None],
                    mask=kv_ok[None, :] & d_ok[:, None], other=0.0)  # [HEAD_PAD, TILE_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
        s = tl.where((kv[None, :] <= q_pos[:, None]) & kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Shift by a finite value: rows with nothing visible yet keep m = -inf and sum 0, no NaN.
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)  # [TILE_N, HEAD_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (tok * NUM_Q_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M] scratch row
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(
    acc_ptr, ml_ptr, out_ptr, stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLIT_PAD)
    s_ok = s < NUM_SPLITS
    part = (t * NUM_Q_HEADS + h) * NUM_SPLITS + s  # [SPLIT_PAD]
    m_s = tl.load(ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m_s, 0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.math.exp2(m_s - m_max)  # [SPLIT_PAD]; empty splits (m = -inf) weigh 0
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(l_s * w, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [HEAD_PAD]
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["num_tokens"])
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, ROW: tl.constexpr, ROW_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] token rows
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    e = tl.arange(0, ROW_PAD)  # element of the flattened [Hkv, D] row
    h = e // HEAD_DIM
    d = e % HEAD_DIM
    ok = (slot >= 0)[:, None] & (e < ROW)[None, :]
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64[:, None] * stride_kt + h[None, :] * stride_kh + d[None, :], mask=ok)
    v = tl.load(v_ptr + t64[:, None] * stride_vt + h[None, :] * stride_vh + d[None, :], mask=ok)
    dst = slot[:, None] * stride_cs + h[None, :] * stride_ch + d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def attention_config(qpk: int, max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_Q, num_warps) for query blocks of up to `max_query_len` rows, `qpk` query
    heads per KV head. Decode: one program per request's whole block; prefill: 64-row tiles."""
    if max_query_len <= DECODE_MAX_Q:
        block_m = max(16, triton.next_power_of_2(triton.next_power_of_2(max(max_query_len, 1)) * qpk))
        block_m = min(block_m, max(128, triton.next_power_of_2(qpk)))
    else:
        block_m = max(64, triton.next_power_of_2(qpk))
    return block_m, block_m // qpk, 8 if block_m >= 128 else 4


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # nominal (an H100's count), so the CPU interpreter takes the same decisions


def default_num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
                       device: torch.device | str) -> int:
    """Split-KV segments: more only while the launch has fewer than ~2 waves of programs and each
    segment keeps >= 4 tiles of keys; never for prefill-shaped batches (they have programs enough)."""
    if max_query_len > DECODE_MAX_Q:
        return 1
    programs, target = max(num_seqs * num_kv_heads, 1), 2 * _sm_count(torch.device(device))
    s = 1
    while s < MAX_SPLITS and programs * s * 2 <= target and max_seq_len >= s * 2 * 4 * TILE:
        s *= 2
    return s


def paged_attention_triton(
    q: torch.Tensor,  # [T, Hq, D] (rows and heads may be strided, D contiguous)
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] contiguous
    v_cache: torch.Tensor,  # [num_slots, Hkv, D] contiguous
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    block_size: int,
    scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """The hints avoid host syncs (the engine knows them; a CUDA graph must get them): the longest
    query block picks the launch shape, `num_splits` (else `default_num_splits`) the split-KV factor."""
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size)
    if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q: the head dimension of q and the caches must be contiguous")
    if not block_tables.is_contiguous() and block_tables.stride(1) != 1:
        raise ValueError("block_tables: rows must be contiguous")
    T, Hq, D = q.shape
    Hkv, B = k_cache.shape[1], seq_lens.shape[0]
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    qpk = Hq // Hkv
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_splits = default_num_splits(B, Hkv, max_query_len, max_seq_len, q.device)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: must be in 1..{MAX_SPLITS}, got {num_splits}")
    block_m, block_q, warps = attention_config(qpk, max_query_len)
    head_pad = triton.next_power_of_2(D)
    if num_splits > 1:
        acc = torch.empty(T * Hq * num_splits * D, dtype=torch.float32, device=q.device)
        ml = torch.empty(T * Hq * num_splits * 2, dtype=torch.float32, device=q.device)
    else:
        acc = ml = out  # unused
    grid = (T // block_q + B, Hkv, num_splits)
    _attn_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, acc, ml,
        scale * _LOG2E, B, block_tables.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0),
        NUM_Q_HEADS=Hq, QPK=qpk, HEAD_DIM=D, HEAD_PAD=head_pad, BLOCK_M=block_m, BLOCK_Q=block_q,
        TILE_N=TILE, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps,
    )
    if num_splits > 1:
        _merge_kernel[(T, Hq)](
            acc, ml, out, out.stride(0), out.stride(1), NUM_Q_HEADS=Hq, HEAD_DIM=D, HEAD_PAD=head_pad,
            NUM_SPLITS=num_splits, SPLIT_PAD=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out


def write_kv_triton(
    k: torch.Tensor,  # [T, Hkv, D] (rows and heads may be strided, D contiguous)
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] contiguous
    v_cache: torch.Tensor,  # [num_slots, Hkv, D] contiguous
    slot_mapping: torch.Tensor,  # [T] int32/int64, -1 = skip
) -> None:
    T, Hkv, D = k.shape
    if v.shape != k.shape or k_cache.shape[1:] != (Hkv, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k: expected k, v [T, Hkv, D] and caches [slots, Hkv, D], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(k_cache.shape)}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping: expected [T] int32/int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if k.stride(2) != 1 or v.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k: the head dimension of k, v and the caches must be contiguous")
    if T == 0:
        return
    row = Hkv * D
    block_t = max(1, min(16, 4096 // triton.next_power_of_2(row)))
    _write_kv_kernel[(math.ceil(T / block_t),)](
        k, v, k_cache, v_cache, slot_mapping, T,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
        HEAD_DIM=D, ROW=row, ROW_PAD=triton.next_power_of_2(row), BLOCK_T=block_t, num_warps=4,
    )
