"""The prefix router's policy without Ray: score table, per-request load gate, KV limit, cold
placement (rendezvous: two routers agree; bounded load: new prefixes spread), fallbacks, the index's
LRU, and a simulated 8-prompt workload against LRU engine caches where affinity keeps every prompt
cached and power-of-two thrashes. The Serve adapter itself runs in tests/cluster/test_routing.py."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from cluster.config import RouterOptions
from cluster.router_policy import PrefixIndex, PrefixPolicy, ReplicaLoad
from workers.block_hash import namespace_root, prefix_hashes

ROOT = namespace_root("m", None, 16)


def _prompt(system: int, question: int, sys_len: int = 160) -> list[int]:
    rng = random.Random(system)
    head = [rng.randrange(1000) for _ in range(sys_len)]
    return head + [5000 + question, 7, 8 + question]


def _h(ids):
    return prefix_hashes(ids, 16, ROOT)


def _loads(*queues, kv=None):
    kv = kv or [0.0] * len(queues)
    return [ReplicaLoad(f"r{i}", q, u) for i, (q, u) in enumerate(zip(queues, kv))]


def test_index_lru_keeps_chain_heads():
    idx = PrefixIndex(capacity=4)
    a, b = _h(_prompt(1, 0, 64)), _h(_prompt(2, 0, 64))  # 4 blocks each
    idx.insert(a)
    assert idx.match(a) == 4 and idx.match(b) == 0
    idx.insert(b[:2])  # over capacity: a's tail goes first, its head stays
    assert len(idx) == 4 and idx.match(a) == 2 and idx.match(b) == 2


def test_affinity_score_table():
    p = PrefixPolicy(RouterOptions())
    h = _h(_prompt(1, 0))  # 10 blocks
    p.record("r1", h[:5])  # r1 holds half the prompt
    d = p.choose(h, _loads(0, 0, 0))
    assert d.outcome == "affinity" and d.ranked[0] == "r1" and d.matched_blocks == 5
    # 3*0.5 + 2*(1-q) + 2*(1-kv): r1 with a queue of 2 (of max 2) scores 1.5 + 0 + 2 = 3.5 against
    # r0's 0 + 2 + 2 = 4: load wins over half a prefix ...
    assert p.choose(h, _loads(0, 2, 0)).ranked[0] in ("r0", "r2")
    # ... but not over a whole one: 3 + 0 + 2 = 5 > 4
    p.record("r1", h)
    assert p.choose(h, _loads(0, 2, 0)).ranked[0] == "r1"
    # KV usage counts too, and a replica over kv_usage_limit is passed over while another is not
    assert p.choose(h, _loads(0, 0, 0, kv=[0.0, 0.97, 0.0])).ranked[0] != "r1"
    assert p.choose(h, _loads(0, 0, kv=[0.99, 0.97])).ranked[0] == "r1"  # all over: still served


def test_load_gate_is_per_request():
    p = PrefixPolicy(RouterOptions(imbalance_abs=8, imbalance_rel=1.5))
    hot, other = _h(_prompt(1, 0)), _h(_prompt(2, 0))
    p.record("r0", hot)
    p.record("r1", other)
    assert p.choose(hot, _loads(8, 0)).outcome == "affinity"  # 8 - 0 is not more than 8
    d = p.choose(hot, _loads(9, 0))
    assert d.outcome == "imbalance" and d.ranked == ["r1", "r0"]
    assert p.choose(hot, _loads(20, 14)).outcome == "affinity"  # 20 < 1.5 * 14: not imbalanced
    # the hot replica's load does not turn affinity off for a prefix that lives elsewhere
    d = p.choose(other, _loads(9, 0))
    assert d.outcome == "affinity" and d.ranked[0] == "r1"


def test_cold_rendezvous_agrees_across_routers_and_spreads():
    loads = _loads(0, 0, 0, 0)
    a, b = PrefixPolicy(), PrefixPolicy()
    picks_a, picks_b = [], []
    for s in range(16):  # 16 new system prompts, seen in the same order by two ingress replicas
        h = _h(_prompt(s, 0))
        for p, picks in ((a, picks_a), (b, picks_b)):
            d = p.choose(h, loads)
            assert d.outcome == "cold"
            picks.append(d.ranked[0])
            p.record(d.ranked[0], h)
    assert picks_a == picks_b
    counts = [picks_a.count(f"r{i}") for i in range(4)]
    assert max(counts) <= 5 and min(counts) >= 3, counts  # bounded load: no replica takes the lot
    # an overloaded replica is not given a new prefix
    h = _h(_prompt(99, 0))
    first = PrefixPolicy().choose(h, loads).ranked[0]
    busy = [ReplicaLoad(x.replica_id, 20 if x.replica_id == first else 0) for x in loads]
    assert PrefixPolicy().choose(h, busy).ranked[0] != first


def test_cold_key_is_the_system_prompt_not_the_template_head():
    """Prompts that share only their first block (a chat template) are different groups; prompts
    that share the key block are one group and land together."""
    p = PrefixPolicy(RouterOptions(cold_balance=10.0))
    loads = _loads(0, 0, 0, 0, 0, 0, 0, 0)
    heads = {p.choose(_h(_prompt(s, 0)), loads).ranked[0] for s in range(12)}
    assert len(heads) > 1
    same = {PrefixPolicy(RouterOptions(cold_balance=10.0)).choose(_h(_prompt(3, q)), loads).ranked[0] for q in range(6)}
    assert len(same) == 1


def test_fallbacks_and_membership():
    p = PrefixPolicy(rng=random.Random(0))
    assert p.choose([], _loads(3, 1)).outcome == "fallback"
    assert p.choose(_h(_prompt(1, 0)), _loads(3)).ranked == ["r0"]
    assert p.choose(_h(_prompt(1, 0)), []).ranked == []
    d = p.choose([], _loads(5, 1, 7))
    assert sorted(d.ranked) == ["r0", "r1", "r2"]
    # pow2: of the two sampled, the shorter queue first
    q = {"r0": 5, "r1": 1, "r2": 7}
    for _ in range(20):
        r = p.choose([], _loads(5, 1, 7)).ranked
        assert q[r[0]] <= q[r[1]]
    h = _h(_prompt(1, 0))
    p.record("r0", h)
    p.record("r1", h)
    p.retain(["r1", "r2"])
    assert set(p.index) == {"r1"}
    p.drop("r1")
    assert p.index == {}
    cold = PrefixPolicy(RouterOptions(cold_policy="pow2"))
    assert cold.choose(h, _loads(0, 0, 0)).outcome == "cold"


class _LRUCache:
    """An engine cache in blocks (LRU), just to score routing policies."""

    def __init__(self, blocks: int) -> None:
        self.blocks, self.lru = blocks, OrderedDict()

    def serve(self, hashes) -> int:
        hit = 0
        for h in hashes:
            if h not in self.lru:
                break
            hit += 1
        for h in hashes:
            self.lru[h] = None
            self.lru.move_to_end(h)
        while len(self.lru) > self.blocks:
            self.lru.popitem(last=False)
        return hit


@pytest.mark.parametrize("seed", range(5))
def test_simulated_workload_affinity_beats_pow2(seed):
    """8 system prompts x 6 requests interleaved on 2 replicas whose caches hold 5 of the prompts
    each: with affinity each replica keeps its half cached (every repeat hits); power of two spreads
    all 8 over both caches, which then evict what is about to be asked again."""
    prompts = [[_h(_prompt(100 * seed + s, q)) for q in range(6)] for s in range(8)]
    blocks = len(prompts[0][0])

    def run(policy: str) -> float:
        caches = {"r0": _LRUCache(5 * blocks), "r1": _LRUCache(5 * blocks)}
        p = PrefixPolicy(rng=random.Random(seed))
        hits = repeats = 0
        for q in range(6):
            for s in range(8):
                h = prompts[s][q]
                d = p.choose(h, _loads(0, 0)) if policy == "prefix" else p.pow2(_loads(0, 0))
                got = caches[d.ranked[0]].serve(h)
                p.record(d.ranked[0], h)
                if q:
                    repeats += 1
                    hits += got == blocks
        return hits / repeats

    prefix, pow2 = run("prefix"), run("pow2")
    assert prefix >= 0.95, prefix
    assert pow2 <= prefix - 0.3, (prefix, pow2)
