"""Where an engine step's time goes, AR against adaptive R-ISD, on the benchmark's prompts.

Wraps the phases of `LLMEngine.step` (schedule and the stride choice, the runner's execute and the
model forward inside it, ISD verify/propose, output processing, the cost model's update) with
timers, runs C prompts x T tokens greedy on both engines (one loaded model, repeats interleaved)
and prints wall min/median, engine steps, rounds by stride and seconds per run in each phase.
Nested phases overlap (forward is inside execute, which is inside step). Answers "is the R-ISD
engine's AR step dearer than AR's, and where" without a profiler's own overhead.

    .venv/bin/python bench/step_phases.py 64 64 3     # C, tokens per request, repeats
    .venv/bin/python bench/step_phases.py 1 128 4
    .venv/bin/python bench/step_phases.py 1 128 4 bfloat16   # dtype as the fourth argument

A benchmark, never a test; time it on an idle machine.
"""

from __future__ import annotations

import collections
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

MODES = ("ar", "risd")


def _timed(obj, name: str, key: str, acc: dict, cur: list) -> None:
    f = getattr(obj, name)

    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[cur[0]][key] += time.perf_counter() - t
    setattr(obj, name, g)


def main(c: int, tokens: int, repeats: int, dtype: str = "float32") -> None:
    loaded = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=4, dtype=dtype))
    engines = {m: LLM("smollm2", loaded=loaded, mode=m, stride=4, max_num_seqs=c, max_num_batched_tokens=4096,
                      kv_cache_tokens=c * (tokens + 200)) for m in MODES}
    acc: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    cur = ["warm-up"]
    _timed(loaded.model, "forward", "model forward", acc, cur)  # one model, shared by both engines: timed once
    for llm in engines.values():
        e = llm.engine
        for obj, name, key in [(e, "step", "step"), (e.scheduler, "schedule", "schedule"),
                               (e.scheduler, "_choose_strides", "choose strides"), (e.runner, "execute", "execute"),
                               (e.decoder, "process", "isd process"), (e, "_apply", "apply outputs"),
                               (e.scheduler, "commit", "commit")]:
            _timed(obj, name, key, acc, cur)
        if e.policy.cost is not None:
            _timed(e.policy.cost, "observe", "cost observe", acc, cur)
    prompts = prompts_for(engines["ar"].tokenizer, c)
    for llm in engines.values():
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    walls: dict[str, list[float]] = {m: [] for m in MODES}
    steps0 = {m: llm.stats().steps for m, llm in engines.items()}
    for _ in range(repeats):
        for m, llm in engines.items():
            cur[0] = m
            t0 = time.perf_counter()
            llm.generate(prompts, sp)
            walls[m].append(time.perf_counter() - t0)
    for m, llm in engines.items():
        st = llm.stats()
        print(f"{m}: wall min {min(walls[m]):.2f} s, median {statistics.median(walls[m]):.2f} s; "
              f"steps per run {(st.steps - steps0[m]) / repeats:.0f}; rounds by stride {dict(sorted(st.rounds_by_stride.items()))}")
        for k, v in sorted(acc[m].items(), key=lambda kv: -kv[1]):
            print(f"    {k:16s} {v / repeats:8.3f} s/run")


if __name__ == "__main__":
    args = [int(x) for x in sys.argv[1:4]]
    main(*(args + [64, 64, 3][len(args):]), *sys.argv[4:5])
