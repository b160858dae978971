"""The prefix-caching block manager: LRU order, revival, eviction, rollback rules, hashing, and a
randomised run of alloc / hit / step-and-trim / preempt / finish / evict that checks every
invariant after each operation (refs equal the tables, free + used = total, a hashed block is never
written, every block free at idle). The same invariants on the real engine are in
tests/workers/test_prefix_cache.py."""

from __future__ import annotations

import random

import pytest

from workers.block_hash import chain_hashes, extend_hashes, namespace_root, prefix_hashes
from workers.block_manager import BlockManager

ROOT = namespace_root("m", None, 4)


def _hashes(tokens, bs=4, root=ROOT):
    return chain_hashes(tokens, bs, root)


def test_hash_chain_is_stable_namespaced_and_prefix_closed():
    a = _hashes(list(range(12)))
    assert len(a) == 3 and all(len(h) == 16 for h in a)
    assert a == _hashes(list(range(12)))  # no per-process salt: same bytes every time
    assert a[0].hex() == chain_hashes(list(range(4)), 4, namespace_root("m", None, 4))[0].hex()
    b = _hashes([0, 1, 2, 99] + list(range(4, 12)))
    assert b[0] != a[0] and b[1] != a[1] and b[2] != a[2]  # a change poisons every later block
    assert _hashes(list(range(12)), root=namespace_root("other", None, 4)) != a
    assert _hashes(list(range(12)), root=namespace_root("m", "adapter", 4)) != a
    assert _hashes(list(range(12)), root=namespace_root("m", None, 4, cache_salt="tenant")) != a
    assert prefix_hashes(list(range(12)), 4, ROOT) == a[:2]  # the last token is always fed
    assert prefix_hashes(list(range(13)), 4, ROOT) == a
    assert prefix_hashes(list(range(13)), 4, ROOT, max_blocks=1) == a[:1]
    grown = extend_hashes(a[:1], list(range(12)), 4, ROOT, 3)
    assert grown == a
    with pytest.raises(ValueError, match="num_blocks"):
        extend_hashes([], list(range(5)), 4, ROOT, 2)


def _cached(num_blocks: int, num_tokens: int) -> tuple[BlockManager, list[int], list[bytes]]:
    """A manager with one table of `num_tokens` tokens, all its blocks registered."""
    bm = BlockManager(num_blocks=num_blocks, block_size=4)
    t: list[int] = []
    bm.grow(t, num_tokens)
    h = _hashes(list(range(num_tokens)))
    bm.register(t, h, 0, len(h))
    return bm, t, h


def test_grow_trim_free_and_lru_eviction():
    bm, t, h = _cached(6, 12)
    assert bm.num_cached == 3 and bm.usage == 0.5
    bm.free(t)  # tail first: block of h[2] is evicted before h[1] before h[0]
    assert bm.num_free == 6 and bm.usage == 0.0 and bm.num_cached == 3
    assert bm.lookup(h) == [0, 1, 2]
    u = []
    bm.grow(u, 12)  # three uncached blocks first, no eviction
    assert bm.evictions == 0 and bm.lookup(h) == [0, 1, 2]
    bm.grow(u, 16)  # the next one evicts the least recently used cached block: the chain's tail
    assert bm.evictions == 1 and bm.lookup(h) == [0, 1]
    bm.grow(u, 24)
    assert bm.evictions == 3 and bm.lookup(h) == []
    bm.check([u])
    bm.free(u)
    bm.check([])


def test_hit_revives_free_block_and_counts_against_free():
    bm, t, h = _cached(4, 8)
    bm.free(t)
    hits = bm.lookup(h)
    assert hits == [0, 1]
    # 2 revived + 2 new = 4 <= 4 free; one more block would not fit
    assert bm.can_admit(hits, 16) and not bm.can_admit(hits, 17)
    a = []
    bm.acquire(a, hits)
    bm.grow(a, 9)
    b = []
    bm.acquire(b, bm.lookup(h))  # shared: ref 2
    bm.check([a, b])
    with pytest.raises(RuntimeError, match="shared or cached"):
        bm.trim(b, 4)  # rollback must never release a shared, hashed block
    with pytest.raises(RuntimeError, match="empty"):
        bm.acquire(a, hits)
    bm.free(b)
    bm.free(a)
    bm.check([])
    assert bm.num_free == 4 and bm.lookup(h) == [0, 1]


def test_register_keeps_first_copy_and_reset_forgets():
    bm = BlockManager(num_blocks=8, block_size=4)
    h = _hashes(list(range(8)))
    a, b = [], []
    bm.grow(a, 8)
    bm.grow(b, 8)
    bm.register(a, h, 0, 2)
    bm.register(b, h, 0, 2)  # computed side by side: b's copy stays private
    assert bm.lookup(h) == a and bm.num_cached == 2
    bm.check([a, b])
    assert bm.reset_prefix_cache() == 2 and bm.lookup(h) == [] and bm.num_cached == 0
    bm.free(a)
    bm.free(b)
    bm.check([])


class _Req:
    def __init__(self, tokens):
        self.tokens = tokens
        self.table: list[int] = []
        self.computed = 0
        self.registered = 0
        self.hashes = _hashes(tokens)


@pytest.mark.parametrize("seed", range(8))
def test_randomised_invariants(seed):
    """Requests over a few shared prefixes run against a small cache: admission takes the
    longest hit (never the last token), steps write past the computed length and roll back MASK
    and rejected-draft rows, registration stays below the computed length, preemption frees and
    re-hits, finished requests leave cached blocks that later get evicted. After every operation
    the bookkeeping is checked and no write lands in a hashed or shared block."""
    rng = random.Random(seed)
    bs, nb = 4, 20
    bm = BlockManager(nb, bs)
    prefixes = [[rng.randrange(50) for _ in range(rng.choice([4, 7, 8, 12]))] for _ in range(4)]
    live: list[_Req] = []
    content: dict[int, tuple] = {}  # hashed block -> the tokens its KV was written for
    written: dict[int, list] = {}  # block -> token per slot (what its KV holds)
    hits_seen = 0

    def write(r: _Req, start: int, rows: list[int]):
        for p, tok in enumerate(rows, start):
            b = r.table[p // bs]
            assert bm._hash[b] is None and bm._ref[b] == 1, "a write reached a shared or hashed block"
            written.setdefault(b, [None] * bs)[p % bs] = tok

    for _ in range(400):
        op = rng.random()
        if op < 0.3 and len(live) < 6:
            r = _Req(rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 13))])
            n = (len(r.tokens) - 1) // bs
            hits = bm.lookup(r.hashes, n)
            if bm.can_admit(hits, len(r.tokens) + 3):
                bm.acquire(r.table, hits)
                r.computed = r.registered = len(hits) * bs
                hits_seen += len(hits)
                bm.grow(r.table, len(r.tokens) + 3)
                live.append(r)
        elif op < 0.75 and live:
            r = rng.choice(live)
            # one step: real rows up to the last token, plus drafts/MASK rows past it
            extra = rng.randrange(0, 4)
            if not bm.can_grow(r.table, len(r.tokens) + extra):
                continue
            bm.grow(r.table, len(r.tokens) + extra)
            write(r, r.computed, r.tokens[r.computed :] + [-1] * extra)  # -1: MASK / draft KV
            r.computed = len(r.tokens)  # all real rows committed, extras rolled back
            bm.trim(r.table, r.computed + 1)
            full = r.computed // bs
            bm.register(r.table, r.hashes, r.registered, full)
            for i in range(r.registered, full):
                b = r.table[i]
                if bm._hash[b] == r.hashes[i]:
                    content[b] = tuple(r.tokens[i * bs : (i + 1) * bs])
            r.registered = full
        elif op < 0.9 and live:
            r = live.pop(rng.randrange(len(live)))  # finish, abort or preempt: refs dropped
            bm.free(r.table)
        bm.check([r.table for r in live])
        # every cached block still holds exactly the committed tokens it was named for
        for b in bm._cached.values():
            assert tuple(written[b]) == content[b], "a cached block was overwritten"
    for r in live:
        bm.free(r.table)
    bm.check([])
    assert bm.num_free == nb
    assert hits_seen > 0 and bm.evictions > 0, (hits_seen, bm.evictions)
