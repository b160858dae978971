"""Cache- and load-aware choice of an engine replica, in pure Python (no Ray): the policy that
`cluster.router` plugs into Ray Serve, unit-tested on its own.

Owns: `ReplicaLoad`, `PrefixIndex` (a bounded LRU of the block digests recently
routed to one replica: an approximate, local picture of that replica's prefix cache, as llm-d's
approximate prefix scorer and SGLang's router tree keep), `PrefixPolicy.choose` (a ranking of
replicas and the outcome that explains it) and `PrefixPolicy.record` (what was routed where).

Settings are `cluster.config.RouterOptions` (the `router` block of the app config). Per request,
with the prompt's block digests (workers.block_hash, sent by the ingress):
- Candidates are the replicas with KV usage under `kv_usage_limit` (all of them if none is).
- score = prefix_weight * matched/total blocks + queue_weight * (1 - normalised queue)
  + kv_weight * (1 - KV usage) (llm-d's default scorers and weights, max wins).
- Affinity: when some replica matches at least `match_threshold` of the blocks, the best score
  wins, unless that replica's queue exceeds the shortest by more than `imbalance_abs` *and* by a
  factor `imbalance_rel`: then this request alone is placed by load (`imbalance`). Affinity is
  never switched off for everyone because one replica is hot (the SGLang / vLLM-router pitfall).
- Cold prefixes (no match): rendezvous hashing of the prompt's key block over the replicas that
  are not overloaded, so independent ingress replicas place a new system prompt on the same
  replica, bounded by load (a replica already holding more than (1 + cold_balance) x its share of
  the indexed blocks is passed over: consistent hashing with bounded loads), so a handful of new
  prefixes spreads over the replicas instead of piling on one. `cold_policy=pow2` instead takes
  the shorter queue of two random replicas.
- Anything doubtful (no digests, one replica) is power-of-two choices (`fallback`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cluster.config import RouterOptions

OUTCOMES = ("affinity", "cold", "imbalance", "fallback", "spill")
"""`idlm_router_decisions_total{outcome}`; `spill`: Serve sent the request past our first choice
(that replica was at max_ongoing_requests)."""


@dataclass
class ReplicaLoad:
    replica_id: str
    queue: int = 0
    """Requests on the replica (ongoing as this router counts them, else its running + waiting)."""
    kv_usage: float = 0.0
    num_blocks: int | None = None


@dataclass
class Decision:
    ranked: list[str]
    """Replica ids, best first."""
    outcome: str
    matched_blocks: int = 0


DEFAULT_INDEX_BLOCKS = 1 << 16


class PrefixIndex:
    """Bounded LRU of block digests. A prompt's digests are inserted tail first, so its head (the
    part most prompts share) is the most recent and evicted last, as the engine frees tail first."""

    def __init__(self, capacity: int = DEFAULT_INDEX_BLOCKS) -> None:
        self.capacity = max(1, capacity)
        self._lru: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: Sequence[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[bytes]) -> None:
        for h in reversed(hashes):
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)


def _rendezvous(key: bytes, replica_id: str) -> bytes:
    return hashlib.blake2b(key + replica_id.encode(), digest_size=8).digest()


class PrefixPolicy:
    def __init__(self, options: RouterOptions | None = None, rng: random.Random | None = None) -> None:
        self.s = options or RouterOptions()
        self.rng = rng or random.Random()
        self.index: dict[str, PrefixIndex] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    def _index(self, load: ReplicaLoad) -> PrefixIndex:
        cap = self.s.index_capacity_blocks or load.num_blocks or DEFAULT_INDEX_BLOCKS
        idx = self.index.get(load.replica_id)
        if idx is None:
            idx = self.index[load.replica_id] = PrefixIndex(cap)
        idx.capacity = max(1, cap)
        return idx

    def record(self, replica_id: str, hashes: Sequence[bytes]) -> None:
        """The request with these digests went to `replica_id`: its cache will hold them."""
        if hashes:
            self.index.setdefault(replica_id, PrefixIndex(self.s.index_capacity_blocks or DEFAULT_INDEX_BLOCKS)).insert(hashes)

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forgets replicas that left the deployment (scaled down, died, replaced)."""
        keep = set(replica_ids)
        for rid in [r for r in self.index if r not in keep]:
            del self.index[rid]

    def drop(self, replica_id: str) -> None:
        self.index.pop(replica_id, None)

    # -- choice ------------------------------------------------------------------------------
    def pow2(self, loads: Sequence[ReplicaLoad], outcome: str = "fallback") -> Decision:
        ids = [x.replica_id for x in loads]
        self.rng.shuffle(ids)
        q = {x.replica_id: x.queue for x in loads}
        head = sorted(ids[:2], key=lambda r: q[r])
        return Decision(head + ids[2:], outcome)

    def choose(self, hashes: Sequence[bytes], loads: Sequence[ReplicaLoad]) -> Decision:
        if not loads:
            return Decision([], "fallback")
        if not hashes or len(loads) == 1:
            return self.pow2(loads)
        s = self.s
        cands = [x for x in loads if x.kv_usage <= s.kv_usage_limit] or list(loads)
        qmin, qmax = min(x.queue for x in cands), max(x.queue for x in cands)
        match = {x.replica_id: self._index(x).match(hashes) for x in loads}

        def load_score(x: ReplicaLoad) -> float:
            qn = 0.0 if qmax == qmin else (x.queue - qmin) / (qmax - qmin)
            return s.queue_weight * (1.0 - qn) + s.kv_weight * (1.0 - x.kv_usage)

        def score(x: ReplicaLoad) -> float:
            return s.prefix_weight * match[x.replica_id] / len(hashes) + load_score(x)

        def overloaded(x: ReplicaLoad) -> bool:
            return x.queue - qmin > s.imbalance_abs and x.queue > s.imbalance_rel * qmin

        def ranked(first: list[ReplicaLoad], key) -> list[str]:
            rest = sorted((x for x in loads if x not in first), key=key, reverse=True)
            return [x.replica_id for x in first + rest]

        best = max(match[x.replica_id] for x in cands)
        if best / len(hashes) >= s.match_threshold:
            top = max(cands, key=score)
            if overloaded(top):
                order = sorted(cands, key=load_score, reverse=True)
                return Decision(ranked(order, load_score), "imbalance", match[order[0].replica_id])
            order = sorted(cands, key=score, reverse=True)
            return Decision(ranked(order, score), "affinity", match[top.replica_id])
        # cold prefix
        fit = [x for x in cands if not overloaded(x)] or cands
        if s.cold_policy == "pow2":
            d = self.pow2(fit, "cold")
            return Decision(d.ranked + [x.replica_id for x in loads if x.replica_id not in d.ranked], "cold")
        key = hashes[min(len(hashes), s.cold_key_blocks) - 1]
        order = sorted(fit, key=lambda x: _rendezvous(key, x.replica_id), reverse=True)
        # bounded loads: pass over replicas already holding more than their share of indexed blocks
        held = {x.replica_id: len(self._index(x)) for x in fit}
        cap = math.ceil((1.0 + s.cold_balance) * (sum(held.values()) + len(hashes)) / len(fit))
        within = [x for x in order if held[x.replica_id] + len(hashes) <= cap]
        if not within:
            least = min(held.values())
            within = [x for x in order if held[x.replica_id] == least]
        first = within[:1] + [x for x in order if x not in within[:1]]
        return Decision(ranked(first, load_score), "cold")
