"""HTTP load test against a running app (`serve run deploy/idlm.yaml`), OpenAI streaming API.

    .venv/bin/python bench/serve.py [--base-url http://127.0.0.1:8000] [--conc 1,2,4,8,16,32] [--requests-per-level 2]

Per concurrency level: throughput (completion tokens/s), TTFT and ITL percentiles (ms), errors.
Writes bench/results/serve.json and serve.png. Never part of the tests. Latest figures: README "Benchmarks".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

OUT = Path(__file__).resolve().parent / "results"
QUESTIONS = ["What is the capital of France?", "Explain photosynthesis simply.", "Write a short poem about the sea.",
             "How do I reverse a list in Python?", "Why is the sky blue?", "How does a hash table work?"]


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one(client, base, model, q, max_tokens):
    body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, ntok = [], 0
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                ntok = d["usage"].get("completion_tokens", ntok)
            if d.get("choices") and d["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError("no content")
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], ntok or len(times)


async def level(base, model, c, n, max_tokens):
    async with httpx.AsyncClient(timeout=600) as client:
        sem = asyncio.Semaphore(c)

        async def run(i):
            async with sem:
                return await one(client, base, model, QUESTIONS[i % len(QUESTIONS)], max_tokens)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(run(i) for i in range(c * n)), return_exceptions=True)
        wall = time.perf_counter() - t0
    ok = [r for r in res if not isinstance(r, BaseException)]
    errs = [repr(r) for r in res if isinstance(r, BaseException)]
    ttft = [r[0] * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r[1]]
    toks = sum(r[2] for r in ok)
    return {"concurrency": c, "requests": len(res), "errors": len(errs), "error_samples": errs[:3], "wall_s": wall,
            "tok_s": toks / wall, "ttft_ms": {p: pct(ttft, p) for p in (50, 90, 99)},
            "itl_ms": {p: pct(itl, p) for p in (50, 90, 99)}, "itl_mean_ms": statistics.mean(itl) if itl else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--conc", default="1,2,4,8,16,32")
    ap.add_argument("--requests-per-level", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    rows = []
    for c in (int(x) for x in a.conc.split(",")):
        r = asyncio.run(level(a.base_url, a.model, c, a.requests_per_level, a.max_tokens))
        rows.append(r)
        print(f"c={c:3d} tok/s {r['tok_s']:8.1f} TTFT p50/p99 {r['ttft_ms'][50]} / {r['ttft_ms'][99]} ms "
              f"ITL p50/p99 {r['itl_ms'][50]} / {r['itl_ms'][99]} ms errors {r['errors']}", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "serve.json").write_text(json.dumps({"base_url": a.base_url, "max_tokens": a.max_tokens, "rows": rows}, indent=1))
    plot(rows)


def plot(rows: list[dict]) -> None:
    """serve.png from a run's rows (also: `python -c "import json, bench.serve as s;
    s.plot(json.load(open('bench/results/serve.json'))['rows'])"`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(cs, [r["tok_s"] for r in rows], "o-")
    ax[0].set_title("tokens/s")
    for p in (50, 99):
        # percentile keys are ints in a run, strings once read back from serve.json
        ax[1].plot(cs, [r["ttft_ms"].get(p, r["ttft_ms"].get(str(p))) for r in rows], "o-", label=f"p{p}")
        ax[2].plot(cs, [r["itl_ms"].get(p, r["itl_ms"].get(str(p))) for r in rows], "o-", label=f"p{p}")
    ax[1].set_title("TTFT ms")
    ax[2].set_title("ITL ms")
    for x in ax:
        x.set_xscale("log", base=2)
        x.set_xlabel("concurrency")
        x.grid(alpha=0.3)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(OUT / "serve.png", dpi=110)


if __name__ == "__main__":
    main()
