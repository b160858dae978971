"""Paged KV-cache bookkeeping in pure Python (no torch): fixed-size blocks, reference counts, per-request
block tables, and the prefix cache (full committed blocks named by their chained hash,
workers.block_hash, shared between requests and kept after they finish until evicted LRU).

Owns: `BlockManager`. Tested in milliseconds without a model.

Every block is either referenced (ref > 0: in at least one block table) or free (ref 0, in the
`_free` LRU). A free block may still be *cached* (it keeps its hash and can be revived by a hit);
it loses the hash only when it is reallocated (eviction, counted in `evictions`). The free LRU is
an OrderedDict (O(1) pop from the front, append and middle delete: what vLLM's linked list buys):
a released cached block goes to the back (evicted last), a released uncached one to the front
(reused first, it holds nothing worth keeping). Tables release their blocks tail first, so a
chain's head, the part most requests share, outlives its tail.

Rules that keep cached KV exact (checked by `check` and the randomised tests):
- A block is registered (`register`) only once it is full of *committed* tokens below the
  request's computed length: KV of MASK rows and rejected drafts lies past that length and is never
  cached. A registered block is never written again: hits are whole blocks and a request computes
  only past its hits.
- Rollback (`trim`) only ever releases unhashed blocks held by that one request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block holding it
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.evictions = 0
        """Cached blocks whose hash was dropped to reuse the block (cumulative)."""

    # -- capacity ----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with ref 0 (cached or not): what allocation can take."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered hash (referenced or free)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a request (free cached blocks do not count: they are
        reclaimable, as vLLM's `kv_cache_usage_perc`)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks that must be added to `table` to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.num_missing(table, num_tokens) <= len(self._free)

    # -- prefix cache ------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes], limit: int | None = None) -> list[int]:
        """Blocks of the longest cached run of `hashes[:limit]` from the start (no state change)."""
        hits = []
        for h in hashes[:limit] if limit is not None else hashes:
            b = self._cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a new table made of `hits` can grow to `num_tokens`: reviving a free cached hit
        takes it off the free list, so it counts against the free blocks too (vLLM's rule)."""
        revived = sum(1 for b in hits if self._ref[b] == 0)
        return max(0, self.blocks_for(num_tokens) - len(hits)) + revived <= len(self._free)

    def acquire(self, table: list[int], hits: list[int]) -> None:
        """Appends the cached `hits` to an empty `table`, taking a reference on each."""
        if table:
            raise RuntimeError("acquire: cache hits start a block table, it must be empty")
        for b in hits:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
            table.append(b)

    def register(self, table: list[int], hashes: Sequence[bytes], start: int, end: int) -> None:
        """Names blocks `table[start:end]` by `hashes[start:end]`: they are full of committed,
        computed tokens. A hash already held by another block stays with that one (two requests that
        computed the same prefix side by side: the later copy is simply not shared)."""
        for i in range(start, end):
            b, h = table[i], hashes[i]
            if self._hash[b] is not None or h in self._cached:
                continue
            self._hash[b] = h
            self._cached[h] = b

    def reset_prefix_cache(self) -> int:
        """Forgets every hash (weights reloaded, benchmarks). Referenced blocks keep serving their
        requests (their KV is still right for them); they are just no longer shared. Returns the
        number of hashes dropped."""
        n = len(self._cached)
        for b in self._cached.values():
            self._hash[b] = None
        self._cached.clear()
        return n

    # -- allocation and release --------------------------------------------------------------
    def grow(self, table: list[int], num_tokens: int) -> None:
        """Appends free blocks to `table` (in place) so it holds `num_tokens` tokens; cached free
        blocks are evicted least recently used first."""
        need = self.num_missing(table, num_tokens)
        if need > len(self._free):
            raise MemoryError(f"KV cache: need {need} blocks, {len(self._free)} free")
        for _ in range(need):
            b, _ = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                del self._cached[h]
                self._hash[b] = None
                self.evictions += 1
            self._ref[b] = 1
            table.append(b)

    def trim(self, table: list[int], num_tokens: int) -> None:
        """Returns the blocks past the first `num_tokens` tokens (rollback of MASK rows and rejected
        drafts). They hold uncommitted KV: never hashed, never shared."""
        keep = self.blocks_for(num_tokens)
        while len(table) > keep:
            b = table[-1]
            if self._hash[b] is not None or self._ref[b] != 1:
                raise RuntimeError(f"trim: block {b} is shared or cached (ref {self._ref[b]}); rollback must not reach it")
            table.pop()
            self._release(b)

    def free(self, table: list[int]) -> None:
        """Drops the table's references, tail first (finish, abort, preemption)."""
        while table:
            self._release(table.pop())

    def _release(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free[b] = None
            if self._hash[b] is None:
                self._free.move_to_end(b, last=False)  # nothing worth keeping: reuse first

    # -- invariants (tests) ------------------------------------------------------------------
    def check(self, tables: Sequence[Sequence[int]]) -> None:
        """Raises AssertionError unless the bookkeeping agrees with `tables` (every live table)."""
        refs = [0] * self.num_blocks
        for t in tables:
            for b in t:
                refs[b] += 1
        assert refs == self._ref, "reference counts differ from the block tables"
        assert all((r == 0) == (b in self._free) for b, r in enumerate(refs)), "free list differs from ref 0"
        assert len(self._free) + sum(1 for r in refs if r) == self.num_blocks, "free + used != total"
        assert all(self._hash[b] == h for h, b in self._cached.items()), "hash map and block hashes differ"
        assert sum(h is not None for h in self._hash) == len(self._cached), "a block hash is not in the map"
