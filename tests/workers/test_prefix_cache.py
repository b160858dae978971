"""Prefix caching on the real engine: token ids are exactly those of the same engine with the cache
off (AR, ISD N=2/4, R-ISD; greedy and seeded sampling; block-aligned and unaligned shared
prefixes, exact repeats, chunked prefill, second-turn prompts holding the first reply, n siblings
submitted together), on tiny random models and on SmolLM2; the block manager's invariants hold
step by step on a running engine under preemption, eviction and aborts; 32 concurrent requests on
a KV budget too small for them all finish with the no-cache output and leak nothing."""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny import tiny_loaded
from workers import LLM, SamplingParams

BS = 8  # small blocks: many block boundaries in short prompts
MAX_NEW = 12


def _tokens(rng: random.Random, n: int, vocab: int = 127) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]  # the MASK id (vocab - 1 = 127) never appears


@pytest.fixture(scope="module")
def loaded():
    lo = tiny_loaded("qwen3", seed=21, lora_rank=4)
    lo.model.has_lora = False
    return lo


def _llm(loaded, mode, stride, cache, **kw):
    loaded.model.has_lora = mode == "risd"
    kw.setdefault("kv_cache_tokens", 4096)
    kw.setdefault("adaptive_stride", False)
    return LLM(loaded=loaded, mode=mode, stride=stride, kv_block_size=BS, enable_prefix_caching=cache, **kw)


def _params(sampled: bool, i: int, max_tokens: int = MAX_NEW) -> SamplingParams:
    if sampled:
        return SamplingParams(temperature=0.9, top_p=0.95, seed=1000 + i, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _prompts(seed: int = 0) -> list[list[int]]:
    """Shared prefixes of every shape the cache distinguishes."""
    rng = random.Random(seed)
    aligned, unaligned = _tokens(rng, 4 * BS), _tokens(rng, 2 * BS + 5)
    prompts = [aligned + _tokens(rng, rng.randrange(1, 10)) for _ in range(3)]
    prompts += [unaligned + _tokens(rng, rng.randrange(1, 10)) for _ in range(3)]
    exact = _tokens(rng, 3 * BS)  # a whole-block prompt asked twice: its last block is recomputed
    prompts += [exact, list(exact), exact + [5], exact + [5]]
    prompts += [aligned]  # a prompt that is another prompt's cached prefix
    return prompts


def _generate(llm, prompts, params, sequential: bool) -> list[list[int]]:
    if sequential:
        return [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    return [o.token_ids for o in llm.generate(prompts, params)]


def _second_turn(prompts, replies, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [p + r + _tokens(rng, 4) for p, r in zip(prompts[:3], replies[:3])]


CASES = [("ar", 1), ("isd", 2), ("isd", 4), ("risd", 4)]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("mode,stride", CASES, ids=[f"{m}{n}" for m, n in CASES])
def test_identity_cache_on_off(loaded, mode, stride, sampled):
    prompts = _prompts()
    params = [_params(sampled, i) for i in range(len(prompts))]
    off, on = _llm(loaded, mode, stride, False), _llm(loaded, mode, stride, True)
    for sequential in (True, False):  # one at a time: hits on finished requests; together: in-flight
        ref = _generate(off, prompts, params, sequential)
        assert _generate(on, prompts, params, sequential) == ref, f"sequential={sequential}"
        turn2 = _second_turn(prompts, ref)
        p2 = [_params(sampled, 50 + i) for i in range(len(turn2))]
        assert _generate(on, turn2, p2, sequential) == _generate(off, turn2, p2, sequential), "second turn"
    st = on.stats()
    assert st.prefix_cache_hits > 0 and off.stats().prefix_cache_queries == 0
    on.reset_prefix_cache()
    assert _generate(on, prompts[:3], params[:3], True) == ref[:3]
    assert on.engine.blocks.num_free == on.engine.blocks.num_blocks


@pytest.fixture(scope="module")
def loaded_llama():
    lo = tiny_loaded("llama", seed=22, lora_rank=4, tie=True)
    lo.model.has_lora = False
    return lo


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("mode,stride", [("isd", 4), ("risd", 4)])
def test_identity_chunked_prefill_and_adaptive_stride(loaded, loaded_llama, family, mode, stride):
    """A token budget smaller than the prompts (chunked prefill mixed with decode blocks and cache
    hits) and the load-adaptive stride, which changes the schedule but never the tokens; both tiny
    model families."""
    loaded = loaded if family == "qwen3" else loaded_llama
    prompts = _prompts(seed=3)
    params = [_params(False, i) for i in range(len(prompts))]
    kw = dict(max_num_batched_tokens=16, adaptive_stride=True)
    off, on = _llm(loaded, mode, stride, False, **kw), _llm(loaded, mode, stride, True, **kw)
    for sequential in (True, False):
        assert _generate(on, prompts, params, sequential) == _generate(off, prompts, params, sequential)
    assert on.stats().prefix_cache_hits > 0


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_n_siblings_compute_the_prompt_once(loaded, sampled):
    """n requests with one prompt, submitted together: the first prefills it, the others wait a
    step and hit it (in-flight deferral), each with its own seed, and the tokens are the no-cache ones."""
    rng = random.Random(9)
    prompt, n = _tokens(rng, 5 * BS + 3), 4
    params = [_params(sampled, i, max_tokens=16) for i in range(n)]
    off, on = _llm(loaded, "isd", 4, False), _llm(loaded, "isd", 4, True)
    ref = [o.token_ids for o in off.generate([prompt] * n, params)]
    outs = on.generate([prompt] * n, params)
    assert [o.token_ids for o in outs] == ref
    if not sampled:
        assert all(r == ref[0] for r in ref)
    st = on.stats()
    full = (len(prompt) - 1) // BS * BS
    assert st.prefix_cache_hits == (n - 1) * full
    assert st.prefix_cache_queries == n * len(prompt)
    assert sorted(o.num_cached_tokens for o in outs) == [0] + [full] * (n - 1)


def test_cached_tokens_on_outputs_and_salt(loaded):
    rng = random.Random(4)
    prompt = _tokens(rng, 3 * BS + 2)
    on = _llm(loaded, "ar", 1, True)
    eng = on.engine
    p = _params(False, 0, max_tokens=3)

    def run(salt=None):
        rid = eng.add_request(prompt, p, cache_salt=salt)
        last = None
        while eng.has_unfinished():
            for o in eng.step():
                if o.request_id == rid:
                    last = o
        return last

    assert run().num_cached_tokens == 0
    assert run().num_cached_tokens == 3 * BS
    assert run("tenant-a").num_cached_tokens == 0  # another tenant never sees the cache
    assert run("tenant-a").num_cached_tokens == 3 * BS
    with pytest.raises(ValueError, match="^cache_salt"):
        eng.add_request(prompt, p, cache_salt=7)


def _kv_snapshot(runner, block: int, bs: int) -> list[torch.Tensor]:
    s = slice(block * bs, (block + 1) * bs)
    return [t[s].clone() for kv in runner.kv_caches for t in kv]


@pytest.mark.parametrize("mode,stride", [("ar", 1), ("isd", 4)])
def test_engine_invariants_under_pressure(loaded, mode, stride):
    """Random arrivals over shared prefixes, aborts and a KV budget that forces preemption and
    eviction, on the real engine. Before every forward: each row it writes lands in a block that
    only its request holds and that is not cached. After every step: refs equal the block tables,
    free + used = total, and every cached block's KV tensors are bit for bit what they were when it
    was registered. At idle every block is free; the finished requests' tokens equal a no-cache run."""
    rng = random.Random(5)
    prefixes = [_tokens(rng, n) for n in (2 * BS, 3 * BS + 3, BS + 1)]
    jobs = [(rng.choice(prefixes) + _tokens(rng, rng.randrange(1, 8)), rng.randrange(4, 16)) for _ in range(40)]
    on = _llm(loaded, mode, stride, True, kv_cache_tokens=20 * BS, max_num_batched_tokens=64)
    eng, bm, runner = on.engine, on.engine.blocks, on.engine.runner
    execute = runner.execute

    def checked_execute(sched):
        for it in sched.items:
            r = it.request
            for pos in range(r.num_computed, r.num_computed + it.num_rows):
                b = r.block_table[pos // BS]
                assert bm._hash[b] is None and bm._ref[b] == 1, f"row {pos} of {r.request_id} writes shared block {b}"
        return execute(sched)

    runner.execute = checked_execute
    snap: dict[int, tuple[bytes, list[torch.Tensor]]] = {}
    done: dict[str, list[int]] = {}
    ids: dict[str, int] = {}
    aborted: set[str] = set()
    pending = list(range(len(jobs)))
    for _ in range(2000):
        if pending and rng.random() < 0.5:
            j = pending.pop(0)
            rid = eng.add_request(jobs[j][0], _params(False, j, jobs[j][1]))
            ids[rid] = j
        if eng.requests and rng.random() < 0.04:
            victim = rng.choice(sorted(eng.requests))
            eng.abort(victim)
            aborted.add(victim)
        for o in eng.step():
            done.setdefault(o.request_id, []).extend(o.new_token_ids)
        bm.check([r.block_table for r in eng.requests.values()])
        for b, h in enumerate(bm._hash):
            if h is None:
                snap.pop(b, None)
            elif b not in snap or snap[b][0] != h:
                snap[b] = (h, _kv_snapshot(runner, b, BS))
            else:
                now = _kv_snapshot(runner, b, BS)
                assert all(torch.equal(x, y) for x, y in zip(now, snap[b][1])), f"cached block {b} was overwritten"
        if not pending and not eng.has_unfinished():
            break
    assert not eng.has_unfinished()
    bm.check([])
    assert bm.num_free == bm.num_blocks
    st = on.stats()
    assert st.preemptions > 0 and bm.evictions > 0 and st.prefix_cache_hits > 0, (st.preemptions, bm.evictions)
    assert st.prefix_cache_preempted_queries > 0
    off = _llm(loaded, mode, stride, False)
    finished = [rid for rid in ids if rid not in aborted]
    ref = off.generate([jobs[ids[r]][0] for r in finished], [_params(False, ids[r], jobs[ids[r]][1]) for r in finished])
    assert [done[r] for r in finished] == [o.token_ids for o in ref]


@pytest.mark.parametrize("mode,stride", [("ar", 1), ("isd", 4)])
def test_32_concurrent_shared_and_unshared_on_small_kv(loaded, mode, stride):
    """Half the requests are seeded samples in AR. Not in ISD: preemption drops a request's drafts,
    which changes which random numbers its later tokens use (still exactly AR-distributed), so
    seeded ISD ids differ between KV budgets even with the cache off; greedy ids never do."""
    rng = random.Random(7)
    shared = [_tokens(rng, 3 * BS + 1), _tokens(rng, 2 * BS)]
    prompts = [(shared[i % 2] if i % 3 else []) + _tokens(rng, rng.randrange(3, 20)) for i in range(32)]
    params = [_params(mode == "ar" and i % 2 == 1, i, 20) for i in range(32)]
    ref = [o.token_ids for o in _llm(loaded, mode, stride, False).generate(prompts, params)]
    small = _llm(loaded, mode, stride, True, kv_cache_tokens=24 * BS, max_num_batched_tokens=128)
    outs = small.generate(prompts, params)
    assert [o.token_ids for o in outs] == ref
    st, bm = small.stats(), small.engine.blocks
    assert st.preemptions > 0 and st.prefix_cache_hits > 0 and bm.evictions > 0
    assert st.requests["length"] == 32
    bm.check([])
    assert bm.num_free == bm.num_blocks  # no leaked block
