"""Counter-based random numbers shared by the torch reference and the Triton kernels.

Owns: the hash that turns (request key, round counter, stream, vocab index) into a uniform in (0, 1).
Both implementations compute the same 32-bit murmur3 finaliser chain, so a Triton kernel and the
torch reference draw *identical* random numbers and their sampled outputs can be compared exactly.
Per-request keys make streams independent across requests (no shared Philox offsets, cf. the
reference implementation's `seed + row` collisions) and make a request's output depend only on its
own seed, never on what it was batched with.

Stream words: `stream * 4 + purpose`, purpose ACCEPT (the scalar u of a draft's ratio test),
SAMPLE (bonus / residual token at a block position), DRAFT (a new draft at a MASK row).
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
C_STEP = 0x9E3779B1
C_STREAM = 0x85EBCA77
C_VOCAB = 0xC2B2AE3D
PURPOSE_ACCEPT = 0
PURPOSE_SAMPLE = 1
PURPOSE_DRAFT = 2


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finaliser on int64 tensors holding uint32 values (products wrap; low 32 bits kept)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def request_key(seed: int) -> int:
    """Folds an arbitrary Python int seed into the 32-bit key of a request's random stream."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    t = torch.tensor([(s & M32) ^ ((s >> 32) * C_STEP & M32)], dtype=torch.int64)
    return int(fmix32(t).item())


def row_hash(key: torch.Tensor, step: torch.Tensor, stream_word: torch.Tensor) -> torch.Tensor:
    """[R] int64 base hash of each row from its request key, round counter and stream word."""
    h = fmix32(key ^ ((step * C_STEP) & M32))
    return fmix32(h ^ ((stream_word * C_STREAM) & M32))


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """uint32 hash -> float32 uniform strictly inside (0, 1): 23 random bits, centred, so every value
    (2k + 1) / 2^24 is exact in float32 and lies in [2^-24, 1 - 2^-24].
    NOTE: 24 bits are one too many: (2^24 - 1) + 0.5 rounds up to 2^24 in float32, giving u = 1,
    E = -log u = 0, and a race score w / E of inf (or NaN, which argmax picks, for w = 0)."""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def row_uniforms(base: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] uniforms, one per (row, vocab index)."""
    j = torch.arange(vocab_size, dtype=torch.int64, device=base.device)
    return uniform_from_hash(fmix32(base[:, None] ^ ((j[None, :] * C_VOCAB) & M32)))


def scalar_uniforms(base: torch.Tensor) -> torch.Tensor:
    """[R] one uniform per row (vocab index 0)."""
    return uniform_from_hash(fmix32(base))
