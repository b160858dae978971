"""R-ISD evaluation on an evaluation split (greedy, our engine):

    python -m training.eval_tpf --model smollm2 --adapter workers/adapters/smollm2-risd --stride 4   # far split
    python -m training.eval_tpf --split novel --stride 4     # or heldout

Prints TPF, per-position acceptance and rounds by kind, and checks that the R-ISD greedy text equals
the AR greedy text (the stored held-out responses were produced by the engine in mode="ar" with the
same max_tokens; --recompute-ar regenerates them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapter", default="workers/adapters/smollm2-risd")
    ap.add_argument("--stride", type=int, nargs="+", default=[4])
    ap.add_argument("--data", default="training/data/smollm2")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=0,
                    help="default: the data builder's (meta.json), so the stored AR responses are the reference")
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--split", choices=["heldout", "novel", "far"], default="far",
                    help="DATA/SPLIT.jsonl: far (hand-written everyday requests from no training generator: "
                         "the figure that counts; `training.data --far`), heldout (unseen pairings of trained "
                         "topics and templates) or novel (topics and templates no training prompt has)")
    ap.add_argument("--recompute-ar", action="store_true")
    ap.add_argument("--anchors", choices=["last", "every"], default="last",
                    help="draft_anchors of the R-ISD engine: last (one MASK group; the figures in "
                         "docs/training.md) or every (a group per real row: no cold rounds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    import torch

    from workers import LLM, SamplingParams

    torch.set_num_threads(a.threads)
    meta = Path(a.data) / "meta.json"
    if not a.max_tokens:
        a.max_tokens = json.loads(meta.read_text())["max_tokens"] if meta.exists() else 128
    held = Path(a.data) / f"{a.split}.jsonl"
    rows = [json.loads(x) for x in open(held)] if held.exists() else []
    if not rows:  # the data builder has not produced this split: same prompts, AR recomputed
        import random

        from training.far_prompts import FAR_PROMPTS
        from training.prompts import all_prompts, novel_prompts

        ps = all_prompts()
        random.Random(0).shuffle(ps)
        ps = {"novel": novel_prompts(), "far": list(FAR_PROMPTS)}.get(a.split, ps[-a.heldout :])
        rows = [{"prompt": p} for p in ps]
        a.recompute_ar = True
    if a.limit:
        rows = rows[: a.limit]
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=False)
    ar = None
    if "prompt_ids" not in rows[0]:
        ar = LLM(a.model, mode="ar", device=a.device, dtype=a.dtype, adaptive_stride=False)
        for r in rows:
            r["prompt_ids"] = ar.encode_chat([{"role": "user", "content": r["prompt"]}])
    prompts = [r["prompt_ids"] for r in rows]
    ref = [r.get("response_ids") for r in rows]
    if a.recompute_ar:
        ar = ar or LLM(a.model, mode="ar", device=a.device, dtype=a.dtype, adaptive_stride=False)
        ref = [list(o.token_ids) for o in ar.generate(prompts, sp)]
    report = {}
    for n in a.stride:
        # fixed stride: this measures the adapter's drafts at N, not the load-adaptive schedule
        llm = LLM(a.model, mode="risd", stride=n, adapter=a.adapter, device=a.device, dtype=a.dtype,
                  adaptive_stride=False, draft_anchors=a.anchors)
        t0 = time.time()
        outs = []
        for i in range(0, len(prompts), a.batch):
            outs += llm.generate(prompts[i : i + a.batch], sp)
        dt = time.time() - t0
        st = llm.stats()
        same = sum(list(o.token_ids) == r for o, r in zip(outs, ref))
        acc = [round(x / d, 3) if d else None for x, d in zip(st.accepted_per_pos, st.drafts_per_pos)]
        rep = {"stride": n, "prompts": len(prompts), "tokens": st.generation_tokens, "forwards": st.decode_forwards,
               "tpf": round(st.tokens_per_forward, 3), "acceptance_rate": round(st.acceptance_rate, 3),
               "accept_per_pos": acc, "rounds": dict(st.rounds), "identical_to_ar": f"{same}/{len(prompts)}",
               "seconds": round(dt, 1)}
        print(json.dumps(rep), flush=True)
        report[n] = rep
    if a.json:
        Path(a.json).write_text(json.dumps(dict(sorted(report.items())), indent=2) + "\n")  # by N, any --stride order


if __name__ == "__main__":
    main()
