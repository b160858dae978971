"""The counter-based RNG of idlm_kernels.rng inside Triton kernels: murmur3 mixing on uint32, the
per-(request, round, stream) row hash, uniforms strictly inside (0, 1) and one Exp(1) draw per
(row, token). Bit-for-bit the same streams as the torch reference (idlm_kernels.rng), so the Triton
and reference samplers draw the same numbers.

Owns: `fmix32`, `row_hash`, `uniform`, `vocab_exp1` (all `@triton.jit`, used by idlm_kernels.acceptance).
"""

from __future__ import annotations

import triton
import triton.language as tl

from idlm_kernels import rng

# Hash constants of idlm_kernels.rng, as compile-time constants of the kernels.
_C_STEP = tl.constexpr(rng.C_STEP)
_C_STREAM = tl.constexpr(rng.C_STREAM)
_C_VOCAB = tl.constexpr(rng.C_VOCAB)


@triton.jit
def fmix32(h):
    # murmur3 finaliser on uint32: products wrap mod 2^32 and >> is a logical shift, as in
    # idlm_kernels.rng.fmix32 (which emulates this with int64 and masks).
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full((), 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def row_hash(key, step, word):
    # key, step, word: uint32 [BLOCK] -> uint32 base hash of a (request, round, stream) row.
    h = fmix32(key ^ (step * tl.full((), _C_STEP, tl.uint32)))
    return fmix32(h ^ (word * tl.full((), _C_STREAM, tl.uint32)))


@triton.jit
def uniform(h):
    # uint32 -> float32 strictly inside (0, 1): 23 random bits, centred, exact (see idlm_kernels.rng).
    return ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def vocab_exp1(base, offs):
    # base: uint32 [BLOCK_R], offs: int32 [BLOCK_V] -> E = -log U, one Exp(1) draw per (row, token).
    h = fmix32(base[:, None] ^ (offs.to(tl.uint32) * tl.full((), _C_VOCAB, tl.uint32))[None, :])
    return -tl.log(uniform(h))
