"""AsyncEngine: concurrent streaming generation, abort on consumer exit, health, stats."""

import asyncio

import pytest

from tests.tiny import random_prompts, tiny_loaded
from workers import LLM, AsyncEngine, EngineConfig, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("qwen3", seed=4)


def test_concurrent_streams_equal_offline(loaded):
    prompts = random_prompts(6, loaded.config.vocab_size, seed=9)
    offline = [o.token_ids for o in LLM(loaded=loaded, mode="isd", stride=4).generate(prompts, GREEDY)]
    eng = AsyncEngine(EngineConfig(model="tiny", mode="isd", stride=4), loaded=loaded)

    async def one(i, p):
        toks, deltas = [], 0
        async for out in eng.generate(p, GREEDY, request_id=f"r{i}"):
            toks += out.new_token_ids
            deltas += 1
            last = out
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 16
        return toks, deltas

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    try:
        res = asyncio.run(main())
        assert [t for t, _ in res] == offline
        assert all(d >= 1 for _, d in res)
        st = eng.stats()
        assert st.requests["length"] == 6 and st.num_running == 0
        assert eng.is_healthy()
    finally:
        eng.shutdown()


def test_consumer_exit_aborts_and_frees_kv(loaded):
    eng = AsyncEngine(EngineConfig(model="tiny", mode="isd", stride=4), loaded=loaded)
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        agen = eng.generate([1, 2, 3], long, request_id="x")
        async for _ in agen:
            break  # client went away after the first delta
        await agen.aclose()
        for _ in range(100):
            if eng.stats().num_running == 0 and eng.engine.blocks.num_free == eng.engine.blocks.num_blocks:
                return True
            await asyncio.sleep(0.05)
        return False

    try:
        assert asyncio.run(main())
        assert eng.stats().requests["abort"] == 1
        with pytest.raises(ValueError, match="^max_tokens"):
            asyncio.run(_first(eng.generate([1] * 10, SamplingParams(max_tokens=10**7))))
        assert eng.is_healthy()
    finally:
        eng.shutdown()


async def _first(agen):
    async for x in agen:
        return x
