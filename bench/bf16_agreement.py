"""Greedy agreement of ISD / R-ISD with AR in bf16 on the CPU (and fp32 beside it), SmolLM2.

In floating point a clean row's logits can depend slightly on how many rows share its forward (batch
variance, DESIGN §1), so greedy ISD could leave AR's path where AR's top two tokens nearly tie. In
bf16 the engine's CPU kernels are batch-invariant (every row computed the same in any step:
workers.models.linear `INVARIANT_ROWS`, `workers.attention.invariant_attention`, the fp32 head on
MKL's packed sgemm), so there this should report no divergence at all; in fp32 the products are
not invariant and agreement rests on fp32 near-ties being rare. This reports, per dtype and mode:
prompts whose outputs are identical to AR's, tokens identical up to the first divergence, and for
each divergence AR's top-2 logit gap at that position (a near-tie when the gap is within a few bf16
ulps of the logit). Logits are computed in fp32 in both dtypes.

    .venv/bin/python bench/bf16_agreement.py [--max-tokens 128] [--modes isd,risd]

Writes bench/results/bf16_agreement.json. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

# everyday prompts of several kinds, none from the training generator
PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.", "List three uses of copper.",
    "How do I reverse a list in Python?", "Why is the sky blue?",
    "Write a SQL query that counts orders per customer.", "Convert 5 miles to kilometres.",
    "What is 17 times 23?", "Write a polite email declining a meeting.",
    "Translate 'good morning, how are you?' into French.", "Make a packing list for a weekend hike.",
    "Explain in detail how photosynthesis works, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe how a computer boots, from pressing the power button to the login screen.",
    "Give a detailed recipe for making bread at home.",
]


def top2_gap(model, ids: list[int]) -> tuple[float, float]:
    """(top1 - top2 logit, |top1|) of the next token after `ids` (dense forward, fp32 logits)."""
    import torch

    with torch.inference_mode():
        h = model(torch.tensor(ids)[None], torch.arange(len(ids))[None])[0, -1:]
        lg = model.compute_logits(h).float()[0]
    v = lg.topk(2).values
    return float(v[0] - v[1]), float(v[0].abs())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--modes", default="isd,risd")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bf16_agreement.json"))
    a = ap.parse_args()
    from workers import LLM, EngineConfig, SamplingParams
    from workers.engine import load_engine_model

    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    res = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "max_tokens": a.max_tokens, "stride": a.stride, "prompts": len(PROMPTS), "dtypes": {}}
    for dt in a.dtypes.split(","):
        loaded = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=a.stride, dtype=dt))
        ar = LLM("smollm2", loaded=loaded, mode="ar", dtype=dt)
        ids = [ar.encode_chat([{"role": "user", "content": q}]) for q in PROMPTS]
        ref = [o.token_ids for o in ar.generate(ids, sp)]
        res["dtypes"][dt] = {}
        for mode in a.modes.split(","):
            for adaptive in (False, True):
                llm = LLM("smollm2", loaded=loaded, mode=mode, stride=a.stride, dtype=dt, adaptive_stride=adaptive)
                outs = [o.token_ids for o in llm.generate(ids, sp)]
                same, tokens_same, total, divergences = 0, 0, 0, []
                for p, r, o in zip(ids, ref, outs):
                    total += len(r)
                    k = next((i for i, (x, y) in enumerate(zip(r, o)) if x != y), min(len(r), len(o)))
                    tokens_same += k
                    if r == o:
                        same += 1
                        continue
                    gap, mag = top2_gap(loaded.model, p + r[:k])
                    # one bf16 ulp at the logit's magnitude: 2^(floor(log2 |x|) - 7)
                    ulp = 2.0 ** (int(mag).bit_length() - 1 - 7) if mag >= 1 else 2.0**-8
                    divergences.append({"prompt": PROMPTS[ids.index(p)], "at_token": k, "ar_top2_gap": gap,
                                        "bf16_ulps": gap / ulp, "near_tie": gap <= 4 * ulp})
                name = f"{mode}{'' if adaptive else '-fixed'}"
                row = {"prompts_identical": same, "prompts": len(ids), "tokens_identical_to_first_divergence": tokens_same,
                       "tokens": total, "divergences": divergences, "tpf": llm.stats().tokens_per_forward}
                res["dtypes"][dt][name] = row
                ties = sum(d["near_tie"] for d in divergences)
                print(f"{dt:9s} {name:11s} identical {same}/{len(ids)} prompts, {tokens_same}/{total} tokens to the first "
                      f"divergence; divergences {len(divergences)} (near-ties {ties}); gaps "
                      f"{[round(d['ar_top2_gap'], 3) for d in divergences]}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
