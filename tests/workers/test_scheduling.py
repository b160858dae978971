"""Scheduler and block manager: KV pressure, preemption and requeue lose or corrupt nothing."""

import pytest

from tests.tiny import random_prompts, tiny_loaded
from workers import LLM, SamplingParams
from workers.block_manager import BlockManager


def test_block_manager_grow_trim_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    t: list[int] = []
    bm.grow(t, 9)
    assert len(t) == 3 and bm.num_free == 5
    bm.trim(t, 5)  # rollback to 5 tokens keeps 2 blocks
    assert len(t) == 2 and bm.num_free == 6
    assert not bm.can_grow(t, 4 * 9)
    with pytest.raises(MemoryError):
        bm.grow(t, 4 * 9)
    bm.free(t)
    assert t == [] and bm.num_free == 8 and bm.usage == 0.0


@pytest.mark.parametrize("mode,stride", [("ar", 1), ("isd", 4)])
def test_32_concurrent_requests_under_tiny_kv_budget(mode, stride):
    loaded = tiny_loaded("llama", seed=11)
    prompts = random_prompts(32, loaded.config.vocab_size, lo=5, hi=30, seed=12)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone_llm = LLM(loaded=loaded, mode=mode, stride=stride, kv_cache_tokens=4096)
    alone = [alone_llm.generate([p], params)[0].token_ids for p in prompts]
    # ~4 requests' worth of KV for 32 requests: admission waits and running ones get preempted.
    small = LLM(loaded=loaded, mode=mode, stride=stride, kv_cache_tokens=192, kv_block_size=8, max_num_batched_tokens=256)
    outs = small.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" and len(o.token_ids) == 20 for o in outs)
    st = small.stats()
    assert st.preemptions > 0, "the budget should force preemption"
    assert small.engine.blocks.num_free == small.engine.blocks.num_blocks  # every block returned
    assert st.requests["length"] == 32


def test_abort_frees_kv():
    loaded = tiny_loaded("qwen3")
    llm = LLM(loaded=loaded, mode="isd", stride=4, kv_cache_tokens=1024)
    eng = llm.engine
    rid = eng.add_request(list(range(10)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.blocks.num_free < eng.blocks.num_blocks
    out = eng.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert not eng.has_unfinished()
