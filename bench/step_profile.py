"""Step time of the engine's decode step: AR vs R-ISD full blocks, per stride, and a torch.profiler table.

alpha (DESIGN §6) = step time of an R-ISD stride-N block / step time of an AR step, same C, same
context. To time *full* blocks (pending + N-1 drafts + N-1 MASKs every round, no cold rounds) the
R-ISD engine runs with an oracle drafter that proposes the AR continuation, so every draft is
accepted; the MASK rows are still computed with the gated LoRA as in serving. Each step is the whole
`LLMEngine.step()` (schedule, inputs, forward, logits, verify, propose, commit, detokenize).

    .venv/bin/python bench/step_profile.py                       # C=1, context ~200, strides 1..4
    .venv/bin/python bench/step_profile.py --conc 1,4 --profile  # + top ops per mode (torch.profiler)
    .venv/bin/python bench/step_profile.py --anchors every       # blocks with a MASK group per real row

`--anchors last` (the default, the alpha of DESIGN §6): one MASK group, 2N-1 rows per request.
`--anchors every` (`draft_anchors="every"`): N groups of N-1, N^2 rows (logits at every row).

Writes bench/results/step_profile.json. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

TEXT = ("Paged attention stores the key and value cache of every request in fixed-size blocks, so a "
        "server can pack many requests into memory without fragmentation. ")


def make_prompts(tok, n: int, ctx: int) -> list[list[int]]:
    out = []
    for i in range(n):
        body = f"Question {i}: " + TEXT * 40
        ids = tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        out.append(ids[-ctx:])
    return out


def write_results(res: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


def time_steps(llm, prompts, params, warm_steps: int, steps: int, profile: bool):
    eng = llm.engine
    for p in prompts:
        eng.add_request(p, params)
    for _ in range(warm_steps):  # prefill + a few decode rounds
        eng.step()
    times, prof_table = [], None
    if profile:
        import torch.profiler as tp

        with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                eng.step()
        prof_table = [
            {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3 / steps}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:14]
        ]
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    for rid in list(eng.requests):
        eng.abort(rid)
    return times, prof_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conc", default="1")
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--anchors", choices=("last", "every"), default="last")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_profile.json"))
    a = ap.parse_args()
    import torch

    from workers import LLM, EngineConfig, SamplingParams
    from workers.engine import load_engine_model

    loaded = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=a.stride, dtype=a.dtype))
    concs = [int(c) for c in a.conc.split(",")]
    need = a.steps * (a.repeats + 2) * a.stride + 64
    params = SamplingParams(temperature=0, max_tokens=need, ignore_eos=True)
    common = dict(loaded=loaded, dtype=a.dtype, max_num_seqs=max(concs), max_num_batched_tokens=8192,
                  kv_cache_tokens=max(concs) * (a.ctx + need + 64))
    ar = LLM("smollm2", mode="ar", **common)
    res = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "ctx": a.ctx, "dtype": a.dtype,
           "anchors": a.anchors, "rows": {}}
    for c in concs:
        prompts = make_prompts(ar.tokenizer, c, a.ctx)
        ref = {tuple(p): o.token_ids for p, o in zip(prompts, ar.generate(prompts, params))}

        def oracle(req, proposed, next_index, ref=ref):
            cont = ref[tuple(req.prompt_token_ids)]
            return cont[next_index: next_index + len(proposed)]

        engines = {"ar": ar}
        for n in range(2, a.stride + 1):
            engines[f"risd-n{n}"] = LLM("smollm2", mode="risd", stride=n, adaptive_stride=False, drafter=oracle,
                                        draft_anchors=a.anchors, **common)
        meds: dict[str, list[float]] = {k: [] for k in engines}
        profs = {}
        for rep in range(a.repeats):  # interleaved so drift hits every mode alike
            for name, llm in engines.items():
                times, table = time_steps(llm, prompts, params, 4, a.steps, a.profile and rep == 0)
                meds[name].append(statistics.median(times))
                if table:
                    profs[name] = table
        row = {name: {"step_ms_median": 1e3 * statistics.median(v), "step_ms_min": 1e3 * min(v),
                      "rows_per_request": 1 if name == "ar" else (int(name[6:]) ** 2 if a.anchors == "every"
                                                                  else 2 * int(name[6:]) - 1)}
               for name, v in meds.items()}
        for name in row:
            row[name]["alpha"] = row[name]["step_ms_median"] / row["ar"]["step_ms_median"]
        res["rows"][str(c)] = {"steps": row, "profile": profs}
        print(f"C={c} ctx={a.ctx} {a.dtype}:")
        for name, r in row.items():
            print(f"  {name:8s} rows/req {r['rows_per_request']:2d}  step {r['step_ms_median']:7.2f} ms "
                  f"(min {r['step_ms_min']:.2f})  alpha {r['alpha']:.3f}")
        for name, table in profs.items():
            print(f"  profile {name} (per step):")
            for e in table:
                print(f"    {e['op'][:40]:40s} {e['calls'] / a.steps:7.1f} calls {e['self_ms']:8.2f} ms")
    write_results(res, a.out)


if __name__ == "__main__":
    main()
