"""Per-step cost of the sampling API (logprobs, penalties, logit_bias, min_p, min_tokens, prompt
logprobs) on SmolLM2 R-ISD, against the same steps without them.

Decode steps: C requests in full R-ISD blocks (an oracle drafter proposes the AR continuation of
the same parameters, so every draft is accepted and every step has the same rows whatever the
options), timed per `LLMEngine.step()`; variants, interleaved over repeats:
- plain: no option (the hot path: no processor or logprobs work at all);
- logprobs: `logprobs=5` on every request;
- penalties: presence + frequency + repetition penalties;
- all: penalties + a 16-entry logit_bias + min_tokens + logprobs=5 (+ min_p where sampled);
- mixed: one request with `all`, the other C-1 plain (what the plain ones pay for sharing a batch).
The ops alone: `LogitsProcessors.prepare + apply` and the logprobs gather on [C * (2N-1), V] rows.
Prefill: one prompt of --prompt-len tokens with and without `prompt_logprobs` (echo scoring).

    .venv/bin/python bench/sampling_cost.py                      # C=1,8, N=4, 20 steps x 3 repeats
    .venv/bin/python bench/sampling_cost.py --conc 1 --steps 4 --repeats 1 --prompt-len 64   # smoke

Writes bench/results/sampling_cost.json. A benchmark, never a test.
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

from bench.step_profile import make_prompts, write_results  # noqa: E402

BIAS = {i: (-1.0) ** i * 0.5 for i in range(100, 1700, 100)}
VARIANTS = {
    "plain": {},
    "logprobs": dict(logprobs=5),
    "penalties": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1, logit_bias=BIAS, min_tokens=8,
                logprobs=5),
}


def _params(kw: dict, need: int):
    from workers import SamplingParams

    return SamplingParams(temperature=0, max_tokens=need, ignore_eos=True, **kw)


def decode_steps(make_llm, prompts, params_list, steps: int) -> list[float]:
    """Step times of full blocks: the oracle continuation comes from an AR run with the same params."""
    ar = make_llm("ar", None)
    ref = {tuple(p): o.token_ids for p, o in zip(prompts, ar.generate(prompts, params_list))}

    def oracle(req, proposed, i):
        return ref[tuple(req.prompt_token_ids)][i: i + len(proposed)]

    llm = make_llm("risd", oracle)
    eng = llm.engine
    for p, sp in zip(prompts, params_list):
        eng.add_request(p, sp)
    for _ in range(4):  # prefill + warm rounds
        eng.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    return times


def ops_alone(C: int, N: int, V: int, repeats: int = 20) -> dict:
    """Milliseconds of the processors and the logprobs gather on C blocks' verify rows."""
    import torch

    from workers import logprobs as lp
    from workers.logits_processors import LogitsProcessors, apply
    from workers.request import Request

    reqs = [Request(str(i), list(range(200)), _params(VARIANTS["all"], 256), rng_key=i) for i in range(C)]
    for r in reqs:
        r.output_token_ids = list(range(300, 428))
    rows = [(r, i * N + j, list(range(500, 500 + j))) for i, r in enumerate(reqs) for j in range(N)]
    proc = LogitsProcessors(V, [2])
    x = torch.randn(C * N, V)
    out = {}
    for name, fn in (("processors", lambda: apply(x.clone(), proc.prepare(rows, x.device))),
                     ("logprobs", lambda: lp.gather(lp.raw(x), torch.zeros(C * N, dtype=torch.long), [5] * (C * N))),
                     ("clone_only", lambda: x.clone())):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(ts)
    return out


def prefill_ms(make_llm, prompt: list[int], prompt_logprobs: int | None, repeats: int) -> float:
    from workers import SamplingParams

    llm = make_llm("risd", None)
    ts = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=prompt_logprobs))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conc", default="1,8")
    ap.add_argument("--ctx", type=int, default=200)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampling_cost.json"))
    a = ap.parse_args()
    import torch

    from workers import LLM, EngineConfig
    from workers.engine import load_engine_model

    loaded = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=a.stride))
    concs = [int(c) for c in a.conc.split(",")]
    need = (4 + a.steps) * a.stride + 8  # warm rounds + timed rounds, each up to `stride` tokens

    def make_llm(mode, drafter, C=max(concs)):
        loaded.model.has_lora = mode == "risd"
        return LLM("smollm2", loaded=loaded, mode=mode, stride=a.stride, adaptive_stride=False, drafter=drafter,
                   max_num_seqs=C, max_num_batched_tokens=8192, kv_cache_tokens=C * (a.ctx + need + 64) + 4096)

    res = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "stride": a.stride, "ctx": a.ctx,
           "decode": {}, "ops_ms": {}, "prefill_ms": {}}
    V = loaded.config.vocab_size
    for C in concs:
        prompts = make_prompts(loaded.tokenizer, C, a.ctx)
        runs = {name: [_params(kw, need)] * C for name, kw in VARIANTS.items()}
        runs["mixed"] = [_params(VARIANTS["all"], need)] + [_params({}, need)] * (C - 1)
        meds: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(a.repeats):  # interleaved so drift hits every variant alike
            for name, pl in runs.items():
                meds[name].append(statistics.median(decode_steps(make_llm, prompts, pl, a.steps)))
        base = statistics.median(meds["plain"])
        row = {name: {"step_ms_median": 1e3 * statistics.median(v), "step_ms_min": 1e3 * min(v),
                      "vs_plain": statistics.median(v) / base} for name, v in meds.items()}
        res["decode"][str(C)] = row
        res["ops_ms"][str(C)] = ops_alone(C, 2 * a.stride - 1, V)
        print(f"C={C} N={a.stride} ctx={a.ctx}:")
        for name, r in row.items():
            print(f"  {name:9s} step {r['step_ms_median']:8.2f} ms (min {r['step_ms_min']:.2f})  x{r['vs_plain']:.3f}")
        print("  ops alone (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in res["ops_ms"][str(C)].items()))
    prompt = make_prompts(loaded.tokenizer, 1, a.prompt_len)[0]
    for k in (None, 5):
        res["prefill_ms"][f"prompt_logprobs={k}"] = prefill_ms(make_llm, prompt, k, a.repeats)
    print(f"prefill of {len(prompt)} tokens: " + ", ".join(f"{k} {v:.1f} ms" for k, v in res["prefill_ms"].items()))
    write_results(res, a.out)


if __name__ == "__main__":
    main()
