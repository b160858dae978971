"""Names of full KV blocks: a chained hash of their token ids under a namespace (pure stdlib).

Owns: `namespace_root` (the digest every chain starts from: model, adapter, block size and an
optional per-request `cache_salt`), `chain_from` / `chain_hashes` / `extend_hashes` (block i's digest =
H(digest of block i-1 || token ids of block i)), and `prefix_hashes` (the prompt's digests as the
ingress sends them to the router). Imported by the engine (workers.block_manager, scheduler), the
ingress and the router, so it imports nothing heavy.

Digest: blake2b, 16 bytes (128 bits: a collision is not a practical concern for any cache size,
unlike 64-bit hashes), over the parent digest and the block's ids as little-endian uint32. Python's
`hash()` is salted per process and would make the ingress, the router and every replica disagree;
blake2b gives the same bytes everywhere. Because each digest covers its parent, equal digests at
block i mean equal token ids in blocks 0..i: a match of block i is a match of the whole prefix.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

DIGEST_SIZE = 16
_VERSION = b"idlm-block-hash/1"


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def namespace_root(model: str, adapter: str | None = None, block_size: int = 16, cache_salt: str | None = None) -> bytes:
    """Digest every chain of this namespace starts from. Different models, adapters, block sizes or
    salts (tenants) never share a block, even with equal token ids."""
    parts = [_VERSION, model.encode(), (adapter or "").encode(), str(block_size).encode()]
    root = _h(b"\x00".join(parts))
    if cache_salt:
        # vLLM salts the first block; chaining makes a salted root equivalent and simpler.
        root = _h(root + b"salt\x00" + cache_salt.encode())
    return root


def _block(parent: bytes, ids: Sequence[int]) -> bytes:
    return _h(parent + struct.pack(f"<{len(ids)}I", *ids))


def chain_from(parent: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Digests of the full blocks of `token_ids`, the first chained onto `parent`."""
    out = []
    for i in range(len(token_ids) // block_size):
        parent = _block(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


def extend_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int, root: bytes, num_blocks: int) -> list[bytes]:
    """Appends to `hashes` (in place) the digests of blocks len(hashes)..num_blocks-1 of `token_ids`
    (the whole sequence from position 0; full blocks only). Returns `hashes`."""
    if num_blocks * block_size > len(token_ids):
        raise ValueError(f"num_blocks: {num_blocks} full blocks need {num_blocks * block_size} tokens, got {len(token_ids)}")
    start = len(hashes)
    if num_blocks > start:
        hashes += chain_from(hashes[-1] if hashes else root, token_ids[start * block_size : num_blocks * block_size], block_size)
    return hashes


def chain_hashes(token_ids: Sequence[int], block_size: int, root: bytes, max_blocks: int | None = None) -> list[bytes]:
    """Digests of the full blocks of `token_ids` (at most `max_blocks`)."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return extend_hashes([], token_ids, block_size, root, n)


def prefix_hashes(token_ids: Sequence[int], block_size: int, root: bytes, max_blocks: int = 512) -> list[bytes]:
    """What the engine can reuse of a prompt: its full blocks short of the last token (which is
    always fed; see workers.scheduler), capped at `max_blocks`. The ingress sends these to the router."""
    return chain_hashes(token_ids[: max(len(token_ids) - 1, 0)], block_size, root, max_blocks)
