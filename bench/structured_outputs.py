"""Structured outputs under R-ISD on SmolLM2: tokens per forward with vs without a grammar on the
same prompts, grammar-mask time per step (p50 / p99), and what unconstrained requests pay for
sharing a batch with constrained ones.

Variants (interleaved over repeats, same prompts, seeds and T):
- plain: no constraint;
- json / json_unmasked: a JSON schema (masked drafting, the default; and unmasked drafting);
- regex: a regex;
- mixed: half the requests constrained by the schema, half plain; the plain ones' TPF and the
  step time are compared with `plain`.
Each run generates until every request finishes (or `--max-tokens`); TPF = output tokens /
forwards; mask time = `ISDDecoder.mask_times` (fill + apply of verify rows and draft rows).

    .venv/bin/python bench/structured_outputs.py                           # C=4, 96 tokens, 3 repeats
    .venv/bin/python bench/structured_outputs.py --conc 2 --max-tokens 16 --repeats 1   # smoke

Writes bench/results/structured_outputs.json. A benchmark, never a test.
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

from bench.step_profile import write_results  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
    "required": ["name", "age", "colors"]}
REGEX = "[A-Z][a-z]{2,12} is [0-9]{1,2} years old\\."
QUESTIONS = ["Describe a person as JSON.", "Give me a JSON record of a cat owner.", "A user profile, please.",
             "Return one person as JSON.", "Who lives next door? Answer as JSON.", "Invent a customer record.",
             "Describe your best friend.", "A JSON object for a student."]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(llm, prompts, constrained: list[dict | None], args, drafts: str) -> dict:
    from workers import SamplingParams

    eng = llm.engine
    eng.decoder.grammar_drafts = drafts
    eng.decoder.mask_times.clear()
    rids = []
    for i, (p, c) in enumerate(zip(prompts, constrained)):
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=i, structured_outputs=c)
        rids.append((eng.add_request(p, sp), c is not None))
    steps, t0, outs = [], time.perf_counter(), {}
    while eng.has_unfinished():
        s = time.perf_counter()
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        steps.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0

    def tpf(sel):
        ms = [outs[r].metrics for r, c in rids if c == sel and r in outs]
        fwd = sum(m.num_forwards for m in ms)
        return sum(m.num_output_tokens for m in ms) / fwd if fwd else None

    masks = list(eng.decoder.mask_times)
    return {"wall_s": wall, "steps": len(steps), "step_p50_s": statistics.median(steps),
            "tpf_constrained": tpf(True), "tpf_plain": tpf(False),
            "mask_p50_s": _percentile(masks, 0.5), "mask_p99_s": _percentile(masks, 0.99),
            "mask_total_s": sum(masks),
            "stop_rate": sum(outs[r].finish_reason == "stop" for r, c in rids if c) / max(1, sum(c for _, c in rids))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conc", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--adaptive", action="store_true", help="adaptive stride (default: fixed N, so TPF compares)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/structured_outputs.json"))
    args = ap.parse_args()
    from workers import LLM

    llm = LLM("smollm2", mode="risd", stride=args.stride, kv_cache_tokens=16384, max_num_seqs=max(8, args.conc),
              adaptive_stride=args.adaptive)
    prompts = [llm.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(args.conc)]
    js, rx = {"json": SCHEMA}, {"regex": REGEX}
    half = [js if i % 2 == 0 else None for i in range(args.conc)]
    variants = {"plain": ([None] * args.conc, "masked"), "json": ([js] * args.conc, "masked"),
                "json_unmasked": ([js] * args.conc, "unmasked"), "regex": ([rx] * args.conc, "masked"),
                "mixed": (half, "masked")}
    res: dict = {"args": vars(args), "runs": {k: [] for k in variants}}
    run(llm, prompts, [js] * args.conc, argparse.Namespace(**{**vars(args), "max_tokens": 8}), "masked")  # warm-up
    for _ in range(args.repeats):
        for name, (cons, drafts) in variants.items():
            r = run(llm, prompts, cons, args, drafts)
            res["runs"][name].append(r)
            print(name, {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    summary = {}
    for name, runs in res["runs"].items():
        summary[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0] if runs[0][k] is not None}
    res["summary"] = summary
    write_results(res, args.out)


if __name__ == "__main__":
    main()
