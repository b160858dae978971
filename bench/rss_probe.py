"""Where a replica's memory goes under the soak's load, without Ray or HTTP in the way.

    .venv/bin/python bench/rss_probe.py --requests 800              # SmolLM2 risd, the soak's mix, C=32
    .venv/bin/python bench/rss_probe.py --requests 800 --trim-every 5   # malloc_trim(0) every 5 s

Runs the soak's request mix (bench/soak_load.py: chat and completions, greedy and sampled, stops,
10% of clients leaving after a few chunks) through one `AsyncEngine` built from the soak's replica
config, at the soak's concurrency, and samples the process RSS. After a warm-up it takes a
`tracemalloc` snapshot and another at the end, and counts live Python objects by type at both: if
the RSS grows while the Python heap and the object counts stay flat, the growth is native (the C
allocator's arenas, torch's CPU allocations), not a leak in our code. Writes
bench/results/rss_probe[_trim].json. A diagnostic, not a timed benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.soak import app_args  # noqa: E402
from bench.soak_load import Spec, workload  # noqa: E402
from cluster.config import AppConfig  # noqa: E402
from workers.async_engine import AsyncEngine  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def object_counts() -> Counter:
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


async def one(engine: AsyncEngine, spec: Spec) -> int:
    if spec.endpoint == "chat":
        ids = engine.encode_chat([{"role": "user", "content": spec.prompt}])
    else:
        ids = engine.encode(spec.prompt)
    params = SamplingParams(max_tokens=spec.max_tokens, temperature=spec.temperature, seed=spec.seed,
                            stop=spec.stop, ignore_eos=spec.ignore_eos)
    chunks = 0
    gen = engine.generate(ids, params)
    try:
        async for _ in gen:
            chunks += 1
            if spec.disconnect_after is not None and chunks >= spec.disconnect_after:
                break  # the client goes away: closing the generator aborts the request
    finally:
        await gen.aclose()
    return chunks


async def run(engine: AsyncEngine, specs: list[Spec], concurrency: int, on_done) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(s: Spec) -> None:
        async with sem:
            await one(engine, s)
        on_done()

    await asyncio.gather(*(guarded(s) for s in specs))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=100, help="requests before the first snapshot")
    ap.add_argument("--trim-every", type=float, default=0.0, help="seconds between malloc_trim(0) calls; 0: none")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    args, _ = app_args(a.tiny, 1)
    args.pop("replica")
    engine = AsyncEngine(AppConfig.model_validate(args).to_engine_config())
    lengths = [4, 12, 32, 64] if a.tiny else [8, 24, 64, 128]
    _, specs = workload(a.requests, a.seed, 0.10, lengths, long_words=60 if a.tiny else 400)
    libc = ctypes.CDLL("libc.so.6")

    t0 = time.monotonic()
    series: list[tuple[float, int, float]] = []  # (s, requests done, RSS MB)
    done = [0]
    stop = threading.Event()

    def sampler() -> None:
        last_trim = time.monotonic()
        while not stop.wait(a.sample_every):
            if a.trim_every and time.monotonic() - last_trim >= a.trim_every:
                libc.malloc_trim(0)
                last_trim = time.monotonic()
            engine.drain_observations()  # as the replica's metrics exporter does
            series.append((round(time.monotonic() - t0, 1), done[0], round(rss_mb(), 1)))

    snap: dict = {}

    def on_done() -> None:
        done[0] += 1
        if done[0] == a.warmup:
            tracemalloc.start(8)
            snap["warm"] = (tracemalloc.take_snapshot(), object_counts(), rss_mb(), time.monotonic() - t0)

    threading.Thread(target=sampler, daemon=True).start()
    asyncio.run(run(engine, specs, a.concurrency, on_done))
    stop.set()
    end_snap, end_counts, end_rss = tracemalloc.take_snapshot(), object_counts(), rss_mb()
    warm_snap, warm_counts, warm_rss, warm_t = snap["warm"]
    diffs = end_snap.compare_to(warm_snap, "traceback")
    heap_growth = sum(d.size_diff for d in diffs) / 2**20
    top = [{"kb": round(d.size_diff / 1024, 1), "count": d.count_diff,
            "where": [f"{f.filename.replace(str(ROOT) + '/', '')}:{f.lineno}" for f in d.traceback][-4:]}
           for d in diffs[:12]]
    objects = dict((end_counts - warm_counts).most_common(12))  # the types whose live count grew most
    st = engine.stats()
    engine.shutdown()
    res = {
        "requests": a.requests, "concurrency": a.concurrency, "trim_every_s": a.trim_every, "tiny": a.tiny,
        "seconds": round(time.monotonic() - t0, 1), "warmup_requests": a.warmup, "warmup_s": round(warm_t, 1),
        "rss_mb_after_warmup": round(warm_rss, 1), "rss_mb_end": round(end_rss, 1),
        "rss_growth_after_warmup_mb": round(end_rss - warm_rss, 1),
        "python_heap_growth_mb": round(heap_growth, 2), "top_heap_growth": top, "object_count_growth": objects,
        "kv_blocks_used_at_end": st.kv_cache_usage, "series": series,
    }
    out = a.out or ROOT / "bench" / "results" / f"rss_probe{'_tiny' if a.tiny else ''}{'_trim' if a.trim_every else ''}.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "series"}, indent=1))
    print("RSS series (s, done, MB):", series[:: max(1, len(series) // 20)])
    return res


if __name__ == "__main__":
    main()
