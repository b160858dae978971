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


def test_a_closed_caller_loop_aborts_its_requests_and_the_engine_lives(loaded):
    """`asyncio.run` ended by an error with other requests still open closes their event loop; the
    step thread used to die delivering to it (RuntimeError: Event loop is closed). Now those
    requests are aborted and the engine serves the next caller."""
    prompts = random_prompts(4, loaded.config.vocab_size, seed=3)
    eng = AsyncEngine(EngineConfig(model="tiny", mode="isd", stride=4), loaded=loaded)
    slow = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def stream(p):
        async for _ in eng.generate(p, slow):
            pass

    async def failing():
        tasks = [asyncio.ensure_future(stream(p)) for p in prompts]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in tasks)  # the streams are open when the caller fails
        raise KeyError("the caller fails")  # asyncio.run cancels the tasks, then closes the loop

    async def one(p):
        return [t async for out in eng.generate(p, GREEDY) for t in out.new_token_ids]

    try:
        with pytest.raises(KeyError):
            asyncio.run(failing())
        for _ in range(200):
            if eng.num_unfinished() == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert eng.is_healthy() and eng.num_unfinished() == 0
        assert len(asyncio.run(one(prompts[0]))) == 16
    finally:
        eng.shutdown()
