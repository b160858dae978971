"""Our engines under continuous batching: R requests queued on C slots (`max_num_seqs = C`), so a
request that finishes early frees its slot for the next one (unlike `bench/engine.py`, where one
wave of C requests runs in lockstep to the same length). Systems ar, ar2 (a second AR engine: the
A/A noise floor), risd (adaptive stride; risd-noguard: without its measured guard) on one loaded
SmolLM2 with the demo adapter; repeats interleaved, the order reversed every other repeat; greedy
tokens compared with ar.

    .venv/bin/python bench/continuous_batching.py --conc 4 --requests 16 --repeats 4

A benchmark, never a test; time it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.engine import prompts_for  # noqa: E402
from workers import LLM, EngineConfig, SamplingParams  # noqa: E402
from workers.engine import load_engine_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conc", type=int, default=4, help="slots (max_num_seqs)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--systems", default="ar,ar2,risd", help="ar, ar2, isd, risd, risd-noguard")
    a = ap.parse_args()
    systems = a.systems.split(",")
    loaded = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=4))
    # "risd-noguard": the adaptive stride without its measured guard (stride_guard=False)
    eng = {s: LLM("smollm2", loaded=loaded, mode="ar" if s == "ar2" else s.removesuffix("-noguard"), stride=4,
                  stride_guard=not s.endswith("-noguard"), max_num_seqs=a.conc,
                  max_num_batched_tokens=4096, kv_cache_tokens=a.requests * (a.max_tokens + 200)) for s in systems}
    ps = prompts_for(eng[systems[0]].tokenizer, a.requests)
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    for e in eng.values():
        e.generate(ps[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    walls: dict[str, list[float]] = {s: [] for s in systems}
    tokens: dict[str, list[list[int]]] = {}
    before = {s: dict(e.stats().rounds_by_stride) for s, e in eng.items()}
    for r in range(a.repeats):
        for s in systems if r % 2 == 0 else systems[::-1]:
            t = time.perf_counter()
            out = eng[s].generate(ps, sp)
            walls[s].append(time.perf_counter() - t)
            tokens[s] = [o.token_ids for o in out]
    ref = systems[0]
    n = a.requests * a.max_tokens
    for s in systems:
        rounds = {k: v - before[s].get(k, 0) for k, v in sorted(eng[s].stats().rounds_by_stride.items())}
        print(f"{s}: walls {[round(w, 2) for w in walls[s]]}; median {n / statistics.median(walls[s]):.1f} tok/s; "
              f"vs {ref} {statistics.median(walls[ref]) / statistics.median(walls[s]):.3f} "
              f"(of bests {min(walls[ref]) / min(walls[s]):.3f}); tokens equal to {ref}: {tokens[s] == tokens[ref]}; "
              f"rounds by stride {rounds}")


if __name__ == "__main__":
    main()
