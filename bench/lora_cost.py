"""What the gated LoRA adds to a step's projections: each fused projection of SmolLM2 with the demo
adapter, timed alone, as AR runs it (1 row), as a block runs it without MASK rows, and as an R-ISD
block runs it (the last rows MASK rows: `LoRALinear._forward_tail_rows`), scaled to a step (x the
layer count). Isolates the LoRA path's per-call cost from the rest of the step, which
`bench/step_diff.py` (profiler, whole steps) cannot do without the profiler's own overhead.

    .venv/bin/python bench/lora_cost.py                    # fp32, blocks (3 rows, 1 MASK), (7, 3), (16, 12)
    .venv/bin/python bench/lora_cost.py --dtype bfloat16

Calls interleaved, medians of `--calls`; warm caches (the weights of one projection fit the L2/L3
cache, unlike a whole step's), so these are lower bounds on a step's cost. A benchmark, never a test.
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

BLOCKS = ((3, 1), (7, 3), (16, 12))  # (rows, MASK rows): stride 2 / 4 with one MASK group, stride 4 `every`


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import torch

    from workers import EngineConfig
    from workers.engine import load_engine_model

    model = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=4, dtype=a.dtype)).model
    layers = model.model.layers
    layer = layers[0]
    projs = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
             "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    res = {"command": " ".join(["python"] + sys.argv), "dtype": a.dtype, "layers": len(layers), "blocks": {}}
    with torch.inference_mode():
        ar = {}
        for name, p in projs.items():
            x = torch.randn(1, p.in_features, generator=g).to(dtype)
            ar[name] = _median_us({"ar": lambda p=p, x=x: p(x)}, a.calls)["ar"]
        print(f"{a.dtype}, {len(layers)} layers; per call us (qkv, o, gate_up, down) and x layers per step:")
        print(f"  AR, 1 row:            {_fmt(ar, len(layers))}")
        for rows, masks in BLOCKS:
            cols: dict[str, dict[str, float]] = {"clean": {}, "lora": {}}
            for name, p in projs.items():
                x = torch.randn(rows, p.in_features, generator=g).to(dtype)
                tail = slice(rows - masks, None)
                t = _median_us({"clean": lambda p=p, x=x: p(x), "lora": lambda p=p, x=x, t=tail: p(x, lora_rows=t)}, a.calls)
                for k in cols:
                    cols[k][name] = t[k]
            print(f"  {rows:2d} rows, no MASK:    {_fmt(cols['clean'], len(layers))}")
            print(f"  {rows:2d} rows, {masks:2d} MASK:    {_fmt(cols['lora'], len(layers))}")
            res["blocks"][f"{rows}x{masks}"] = cols
        res["ar"] = ar
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")


def _median_us(fns: dict, calls: int) -> dict[str, float]:
    for f in fns.values():  # warm-up: lazy packing
        for _ in range(20):
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(calls):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: 1e6 * statistics.median(v) for k, v in ts.items()}


def _fmt(us: dict[str, float], layers: int) -> str:
    return " ".join(f"{v:6.1f}" for v in us.values()) + f"  = {sum(us.values()) * layers / 1e3:5.2f} ms/step"


if __name__ == "__main__":
    main()
