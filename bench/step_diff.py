"""Where an R-ISD block's extra time goes: torch.profiler self CPU time per op of the engine's
decode step, AR against full R-ISD blocks of one fixed stride and layout, and their difference.

Full blocks come from an oracle drafter that proposes the AR continuation (as in
`bench/step_profile.py`), so every step carries its drafts and MASK rows; SmolLM2 fp32, one
request, context ~200.

    .venv/bin/python bench/step_diff.py                        # stride 2, one MASK group
    .venv/bin/python bench/step_diff.py --stride 2 --anchors every
    .venv/bin/python bench/step_diff.py --stride 4 --dtype bfloat16

A benchmark, never a test; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch.profiler as tp  # noqa: E402

from bench.step_profile import make_prompts  # noqa: E402
from workers import LLM, EngineConfig, SamplingParams  # noqa: E402
from workers.engine import load_engine_model  # noqa: E402


def profile_steps(llm, prompts, params, steps: int) -> dict[str, tuple[float, float]]:
    """op -> (calls, self CPU ms) per step, over `steps` decode steps after a short warm-up."""
    eng = llm.engine
    for p in prompts:
        eng.add_request(p, params)
    for _ in range(6):
        eng.step()
    with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    for rid in list(eng.requests):
        eng.abort(rid)
    return {e.key: (e.count / steps, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--anchors", choices=("last", "every"), default="last")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    loaded = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=a.stride, dtype=a.dtype))
    params = SamplingParams(temperature=0, max_tokens=a.steps * a.stride + 64, ignore_eos=True)
    common = dict(loaded=loaded, dtype=a.dtype, max_num_seqs=1, max_num_batched_tokens=8192, kv_cache_tokens=2048)
    ar = LLM("smollm2", mode="ar", **common)
    prompts = make_prompts(ar.tokenizer, 1, 200)
    ref = {tuple(p): o.token_ids for p, o in zip(prompts, ar.generate(prompts, params))}

    def oracle(req, proposed, next_index):
        return ref[tuple(req.prompt_token_ids)][next_index: next_index + len(proposed)]

    risd = LLM("smollm2", mode="risd", stride=a.stride, adaptive_stride=False, drafter=oracle,
               draft_anchors=a.anchors, **common)
    ta, tr = profile_steps(ar, prompts, params, a.steps), profile_steps(risd, prompts, params, a.steps)
    print(f"self CPU ms per step: AR {sum(v[1] for v in ta.values()):.2f}, "
          f"R-ISD N={a.stride} {a.anchors} {sum(v[1] for v in tr.values()):.2f}")
    zero = (0.0, 0.0)
    for k in sorted(set(ta) | set(tr), key=lambda k: ta.get(k, zero)[1] - tr.get(k, zero)[1])[: a.top]:
        x, y = ta.get(k, zero), tr.get(k, zero)
        print(f"  {k[:44]:44s} AR {x[0]:6.0f} calls {x[1]:6.2f} ms | R-ISD {y[0]:6.0f} calls {y[1]:6.2f} ms | {y[1] - x[1]:+.2f}")


if __name__ == "__main__":
    main()
