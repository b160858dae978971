"""Prefix-cache benchmark: time to first token with the cache on vs off, same engine, same run.

SmolLM2 (the demo model; --mode risd by default, the demo configuration) serves chat requests that
share one ~1,024-token system prompt and differ in a short question. Sequentially (C=1) and closed
loop at C=8 (eight in flight; each one that finishes is replaced), cache off and on, the repeats
interleaved (off, on, off, on, ...) on one loaded model (DESIGN §6: ratios side by side). TTFT is
the engine's own (request admitted -> first token committed), so it measures the prefill the cache
saves, not HTTP. Reported per configuration: p50 / p90 TTFT (median over repeats), prompt tokens
computed vs served from the cache, hit rate, wall time; and p50 TTFT off / on per C.

    .venv/bin/python bench/prefix_cache.py                     # the README figures (a few minutes)
    .venv/bin/python bench/prefix_cache.py --quick             # smoke: 128-token prompt, 4 questions

Writes bench/results/prefix_cache.json (or --out). Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ holds kernels.py, which would shadow a top-level `kernels` package (e.g. HF hub kernels)
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

SENTENCES = [
    "You are the assistant of the city's public transport company.",
    "Answer riders' questions politely, precisely and in no more than two sentences.",
    "Buses run from five in the morning until midnight; night buses run every thirty minutes after that.",
    "A single ticket costs two euros and is valid for ninety minutes on buses, trams and the metro.",
    "Day passes cost seven euros, weekly passes twenty-two euros, and monthly passes sixty euros.",
    "Children under six travel free; students and seniors pay half price with a valid card.",
    "Bicycles are allowed on trams outside rush hours, which are seven to nine and four to seven.",
    "Lost property is kept for thirty days at the central station office, open nine to five.",
    "If a service is cancelled, tell the rider about the replacement bus and the expected delay.",
    "Never invent timetables; if you do not know, say so and point to the journey planner.",
]
QUESTIONS = [
    "How much is a day pass?", "When does the last bus run?", "Can I take my bike on the tram at 8am?",
    "Where do I find lost property?", "Do children pay?", "How long is a single ticket valid?",
    "Is there a student discount?", "What happens if my bus is cancelled?", "How much is a weekly pass?",
    "Do night buses run on Sundays?", "Can seniors travel for free?", "Where is the central station office?",
    "What are the rush hours?", "Is the metro included in the ticket?", "How often do night buses run?",
    "Can I buy a monthly pass?",
]


def system_turn_tokens(tok, text: str) -> int:
    ids = tok.apply_chat_template([{"role": "system", "content": text}], tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def system_prompt(tok, tokens: int) -> str:
    """The first sentences-based system prompt whose chat-templated system turn reaches `tokens`."""
    text, i = "", 0
    while system_turn_tokens(tok, text) < tokens:
        text += SENTENCES[i % len(SENTENCES)] + (f" (Rule {i}.) " if i >= len(SENTENCES) else " ")
        i += 1
    return text


def prompts(tok, system: str, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + (f" (asked {i // len(QUESTIONS) + 1} times)" if i >= len(QUESTIONS) else "")
        ids = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                      add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def run(engine, batch: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """Closed loop: `concurrency` requests in flight until all of `batch` has run."""
    from workers import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    todo, ttft, cached, prompt_tokens = list(batch), [], 0, 0
    t0 = time.perf_counter()
    while todo or engine.has_unfinished():
        while todo and len(engine.requests) < concurrency:
            engine.add_request(todo.pop(0), params)
        for out in engine.step():
            if out.finished:
                m = out.metrics
                ttft.append(m.first_token_time - m.arrival_time)
                cached += out.num_cached_tokens
                prompt_tokens += out.num_prompt_tokens
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttft, n=10) if len(ttft) > 1 else ttft * 9
    return {"ttft_p50_s": statistics.median(ttft), "ttft_p90_s": q[8], "ttft_mean_s": statistics.fmean(ttft),
            "prompt_tokens": prompt_tokens, "cached_tokens": cached, "prefill_tokens_computed": prompt_tokens - cached,
            "hit_rate": cached / prompt_tokens if prompt_tokens else 0.0, "wall_s": wall, "requests": len(ttft)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="risd", choices=["ar", "isd", "risd"])
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--questions", type=int, default=16, help="requests per configuration")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--conc", default="1,8", help="concurrencies, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke settings: 128-token prompt, 4 questions, 1 repeat")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix_cache.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.system_tokens, a.questions, a.max_tokens, a.repeats = 128, 4, 2, 1

    from workers.config import EngineConfig
    from workers.engine import LLMEngine, load_engine_model

    base = dict(model="smollm2", mode=a.mode, stride=1 if a.mode == "ar" else 4, kv_cache_tokens=32768,
                max_num_seqs=16, max_num_batched_tokens=2048)
    loaded = load_engine_model(EngineConfig(**base))
    engines = {c: LLMEngine(EngineConfig(**base, enable_prefix_caching=c), loaded=loaded) for c in (False, True)}
    system = system_prompt(loaded.tokenizer, a.system_tokens)
    batch = prompts(loaded.tokenizer, system, a.questions)
    warm = prompts(loaded.tokenizer, "You are a helpful assistant.", 2)
    conc = [int(c) for c in a.conc.split(",")]
    runs: dict[str, list[dict]] = {}
    for rep in range(a.repeats):
        for c in conc:
            for cache in (False, True):
                eng = engines[cache]
                run(eng, warm, 2, 2)
                eng.reset_prefix_cache()  # every timed run starts cold: its first request computes the prompt
                r = run(eng, batch, c, a.max_tokens)
                runs.setdefault(f"{'on' if cache else 'off'}-c{c}", []).append(r)
                print(f"repeat {rep} C={c} cache={'on' if cache else 'off'}: p50 TTFT {r['ttft_p50_s'] * 1e3:.1f} ms, "
                      f"computed {r['prefill_tokens_computed']} / {r['prompt_tokens']} prompt tokens, "
                      f"hit rate {r['hit_rate']:.3f}", flush=True)
    summary = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    ratios = {f"c{c}": summary[f"off-c{c}"]["ttft_p50_s"] / summary[f"on-c{c}"]["ttft_p50_s"] for c in conc}
    result = {
        "config": {**base, "system_prompt_tokens": system_turn_tokens(loaded.tokenizer, system),
                   "prompt_tokens": [len(p) for p in batch], "max_tokens": a.max_tokens, "repeats": a.repeats,
                   "concurrency": conc, "machine": platform.platform(), "python": platform.python_version()},
        "summary": summary, "ttft_p50_speedup": ratios, "runs": runs,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    for c in conc:
        on, off = summary[f"on-c{c}"], summary[f"off-c{c}"]
        print(f"C={c}: p50 TTFT off {off['ttft_p50_s'] * 1e3:.1f} ms, on {on['ttft_p50_s'] * 1e3:.1f} ms "
              f"({ratios[f'c{c}']:.2f}x); hit rate {on['hit_rate']:.3f}; prompt tokens computed "
              f"{off['prefill_tokens_computed']} -> {on['prefill_tokens_computed']}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
