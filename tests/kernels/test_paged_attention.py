"""Triton paged attention and KV write against the torch reference (CPU: `TRITON_INTERPRET=1`, fp32
and fp16; `-m gpu`: the same on CUDA, plus bf16 and int64 addressing of a cache over 2^31 elements).

The matrix covers each dimension on its own plus mixed cases (not the cartesian product, which the
interpreter could not run in CI time): GQA ratios 1/4/8 and 5:1, head_dim 64 and 128, block sizes
16 and 32, query lengths 1..7 in one batch, prefill chunks up to 128, contexts 0 / not a multiple
of the block / a multiple, one and many requests, zero-length (padding) requests, split-KV off and
1/2/4/16 segments. Block tables are random permutations of the physical blocks (never contiguous).
"""

from __future__ import annotations

import pytest
import torch

import idlm_kernels
from idlm_kernels.paged_attention import (
    attention_config,
    default_num_splits,
    paged_attention_triton,
    write_kv_triton,
)
from idlm_kernels.paged_attention_ref import paged_attention_ref, write_kv_ref

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(q_lens, ctx_lens, hq, hkv, d, block_size, dtype=torch.float32, device="cpu", seed=0,
              spare_blocks=3, first_block=0):
    """Random q and caches; request b's blocks are a random subset of the physical blocks."""
    g = torch.Generator(device).manual_seed(seed)
    seq = [c + q for c, q in zip(ctx_lens, q_lens)]
    width = max([-(-s // block_size) for s in seq] + [1])
    num_blocks = first_block + len(seq) * width + spare_blocks
    perm = first_block + torch.randperm(num_blocks - first_block, generator=g, device=device)
    tables = perm[: len(seq) * width].view(len(seq), width).int()
    k_cache = torch.randn(num_blocks * block_size, hkv, d, generator=g, device=device).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, hkv, d, generator=g, device=device).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=g, device=device).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, torch.tensor(seq, dtype=torch.int32, device=device), qsl


def check(q_lens, ctx_lens, hq, hkv, d, bs, dtype, splits, device="cpu", **kw):
    q, kc, vc, bt, sl, qsl = make_case(q_lens, ctx_lens, hq, hkv, d, bs, dtype, device, **kw)
    scale = d**-0.5
    got = paged_attention_triton(q, kc, vc, bt, sl, qsl, bs, scale, num_splits=splits)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, bs, scale, out_dtype=torch.float32)
    err = (got.float() - ref).abs().max().item() if got.numel() else 0.0
    assert err <= TOL[dtype], f"max |diff| {err:.3g} > {TOL[dtype]}"
    return got


# (q_lens, ctx_lens, Hq, Hkv, head_dim, block_size, dtype, num_splits)
CASES = [
    # one dimension at a time, from a base of ISD-shaped decode blocks
    ([7], [40], 4, 1, 64, 16, torch.float32, 1),  # GQA 4, one request
    ([7], [40], 1, 1, 64, 16, torch.float32, 1),  # GQA 1 (MHA)
    ([7], [40], 8, 1, 64, 16, torch.float32, 1),  # GQA 8
    ([3, 7], [21, 9], 5, 1, 64, 16, torch.float32, 1),  # GQA 5:1 (non power of two)
    ([7], [40], 4, 1, 128, 16, torch.float32, 1),  # head_dim 128
    ([7], [40], 4, 1, 64, 32, torch.float32, 1),  # block 32
    ([1, 2, 3, 4, 5, 6, 7], [5, 16, 31, 0, 47, 17, 1], 8, 2, 64, 16, torch.float32, 1),  # q 1..7 in one batch
    ([7, 7, 7], [0, 0, 0], 4, 2, 64, 16, torch.float32, 1),  # nothing cached
    ([1], [0], 4, 1, 64, 16, torch.float32, 1),  # a single token, empty cache
    ([16], [32], 4, 1, 64, 16, torch.float32, 1),  # context a multiple of the block
    ([128], [0], 4, 1, 64, 16, torch.float32, 1),  # a prefill chunk of 128, no cache
    ([100, 7, 1], [33, 70, 5], 8, 1, 64, 32, torch.float32, 1),  # prefill chunk with decode blocks
    ([17, 1], [15, 1], 2, 2, 64, 16, torch.float32, 1),  # just over the decode configuration
    ([0, 7, 0, 3], [0, 20, 0, 9], 4, 1, 64, 16, torch.float32, 1),  # zero-length padding requests
    # split-KV (flash-decoding)
    ([7], [300], 4, 1, 64, 16, torch.float32, 4),
    ([1, 7, 3], [250, 9, 600], 8, 1, 64, 16, torch.float32, 16),  # more segments than some rows' tiles
    ([7, 2], [0, 40], 4, 2, 128, 32, torch.float32, 2),
    ([64], [100], 4, 1, 64, 16, torch.float32, 4),  # split-KV of a prefill chunk
    # fp16, mixed
    ([7], [40], 4, 1, 64, 16, torch.float16, 1),
    ([1, 7, 5], [200, 33, 0], 8, 1, 128, 16, torch.float16, 4),
    ([120, 3], [9, 60], 4, 2, 64, 32, torch.float16, 1),
]


@pytest.mark.parametrize("q_lens,ctx_lens,hq,hkv,d,bs,dtype,splits", CASES)
def test_matches_reference(q_lens, ctx_lens, hq, hkv, d, bs, dtype, splits):
    check(q_lens, ctx_lens, hq, hkv, d, bs, dtype, splits)


def test_split_kv_agrees_with_single_pass():
    case = ([1, 7, 4], [500, 130, 64], 4, 1, 64, 16, torch.float32, 1)
    one = check(*case)
    for s in (2, 16):
        many = check(*case[:-1], s)
        torch.testing.assert_close(many, one, rtol=0, atol=2e-6)


def test_strided_q_rows():
    """q as the engine passes it: a slice of the fused qkv projection (rows strided, D contiguous)."""
    q, kc, vc, bt, sl, qsl = make_case([7, 3], [20, 5], 4, 1, 64, 16)
    fused = torch.cat([q, torch.randn(q.shape[0], 2, 64)], dim=1)  # [T, Hq + 2, D]
    view = fused[:, :4]
    assert not view.is_contiguous()
    got = paged_attention_triton(view, kc, vc, bt, sl, qsl, 16, 0.125)
    torch.testing.assert_close(got, paged_attention_ref(q, kc, vc, bt, sl, qsl, 16, 0.125), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,slot_dtype", [(torch.float32, torch.int64), (torch.float16, torch.int32)])
def test_write_kv_exact(dtype, slot_dtype):
    g = torch.Generator().manual_seed(1)
    T, hkv, d, slots = 37, 2, 64, 160
    qkv = torch.randn(T, 4 + 2 * hkv, d, generator=g).to(dtype)  # k, v are strided views, as in the model
    k, v = qkv[:, 4 : 4 + hkv], qkv[:, 4 + hkv :]
    slot_mapping = torch.randperm(slots, generator=g)[:T].to(slot_dtype)
    slot_mapping[::5] = -1  # padding rows: skipped
    caches = [torch.randn(slots, hkv, d, generator=g).to(dtype) for _ in range(2)]
    ref = [c.clone() for c in caches]
    write_kv_triton(k, v, *caches, slot_mapping)
    write_kv_ref(k, v, *ref, slot_mapping)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])
    kept = slot_mapping[slot_mapping >= 0].long()
    assert torch.equal(caches[0][kept], k[slot_mapping >= 0])


def test_dispatcher_forces_either_backend(monkeypatch):
    case = make_case([7, 2], [11, 30], 4, 2, 64, 16)
    ref = paged_attention_ref(*case, 16, 0.1)
    monkeypatch.setenv("IDLM_ATTENTION", "torch")
    assert idlm_kernels.attention_backend("cpu") == "torch"
    assert torch.equal(idlm_kernels.paged_attention(*case, 16, 0.1), ref)
    monkeypatch.setenv("IDLM_ATTENTION", "triton")
    torch.testing.assert_close(idlm_kernels.paged_attention(*case, 16, 0.1, num_splits=2), ref, rtol=0, atol=1e-5)
    monkeypatch.delenv("IDLM_ATTENTION")
    assert idlm_kernels.attention_backend("cpu") == "torch"
    monkeypatch.setenv("IDLM_ATTENTION", "cuda")
    with pytest.raises(ValueError, match="^IDLM_ATTENTION: "):
        idlm_kernels.attention_backend("cpu")


def test_contract_errors_name_the_argument():
    q, kc, vc, bt, sl, qsl = make_case([7], [9], 4, 1, 64, 16)
    with pytest.raises(ValueError, match="^block_tables: must be int32"):
        paged_attention_triton(q, kc, vc, bt.long(), sl, qsl, 16, 0.1)
    with pytest.raises(ValueError, match="^q: "):
        paged_attention_triton(q.half(), kc, vc, bt, sl, qsl, 16, 0.1)
    with pytest.raises(ValueError, match="^q: head_dim"):
        paged_attention_triton(q[..., :32], kc, vc, bt, sl, qsl, 16, 0.1)
    with pytest.raises(ValueError, match="^num_splits: "):
        paged_attention_triton(q, kc, vc, bt, sl, qsl, 16, 0.1, num_splits=17)
    with pytest.raises(ValueError, match="^slot_mapping: "):
        write_kv_triton(kc[:3], vc[:3], kc, vc, torch.zeros(3))


def test_launch_heuristics():
    # an ISD block of 7 rows is one program per KV head (BLOCK_Q >= 7) at GQA 1..8
    for qpk in (1, 4, 5, 8):
        block_m, block_q, _ = attention_config(qpk, 7)
        assert block_q >= 7 and block_m >= 16 and block_m & (block_m - 1) == 0
    assert attention_config(4, 128)[0] == 64  # prefill tiles
    # split-KV: long contexts at small batch only; never for prefill-shaped batches
    assert default_num_splits(1, 8, 7, 4096, "cpu") == 16
    assert default_num_splits(64, 8, 7, 4096, "cpu") == 1
    assert default_num_splits(1, 8, 7, 100, "cpu") == 1
    assert default_num_splits(1, 8, 128, 4096, "cpu") == 1


# -- CUDA (`-m gpu`) ----------------------------------------------------------------------------
GPU_CASES = [
    ([7] * 32, [4000 + 37 * i for i in range(32)], 32, 8, 128, 16, 1),  # I-DLM-8B: C=32 ISD blocks, 4k context
    ([7] * 4, [16000, 3, 517, 4096], 32, 8, 128, 16, 16),  # split-KV, long and short contexts
    ([1] * 16, [2011, 37, 523, 1328] * 4, 32, 8, 128, 16, 8),  # AR decode
    ([513, 7, 1], [0, 300, 1000], 64, 8, 128, 16, 1),  # 32B head ratio, a long prefill chunk
    ([7, 5, 3], [77, 19, 1], 20, 4, 64, 32, 2),  # GQA 5:1
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_matches_reference(case, dtype):
    check(*case[:5], case[5], dtype, case[6], device="cuda")


@pytest.mark.gpu
def test_gpu_int64_addressing():
    """Blocks past 2^31 elements of the cache (vLLM tests num_blocks=32768 for the same reason)."""
    hkv, d, bs = 8, 128, 16
    first = (2**31) // (bs * hkv * d) + 1  # the first block whose elements sit past 2^31
    check([7, 1], [40, 300], 32, hkv, d, bs, torch.bfloat16, 1, device="cuda", first_block=first, spare_blocks=0)
    check([7, 1], [40, 300], 32, hkv, d, bs, torch.bfloat16, 4, device="cuda", first_block=first, spare_blocks=0)


@pytest.mark.gpu
def test_gpu_write_kv_exact():
    k, v = torch.randn(2, 300, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(4096, device="cuda")[:300]
    slots[::7] = -1
    caches = [torch.zeros(4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ref = [c.clone() for c in caches]
    write_kv_triton(k, v, *caches, slots)
    write_kv_ref(k, v, *ref, slots)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])
