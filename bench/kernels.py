"""Benchmark (not a test): Triton acceptance kernels vs the torch reference on a GPU.

    python bench/kernels.py [--repeats 20] [--out bench/results/kernels.json]

Shapes: vocab 151,936 (Qwen3 / I-DLM), bf16 logits, 32 requests x 3 drafts (N=4) and 256 x 7 (N=8),
greedy and sampled. Reports min/median milliseconds over repeats, the speed-up over the reference,
and the fraction of HBM bandwidth reached (bytes of logits read / time; H100 SXM: 3.35 TB/s).
On a machine without CUDA it refuses to time Triton (the CPU interpreter says nothing about GPU
speed) and prints "not measured".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import SamplingMetadata  # noqa: E402
from kernels.acceptance_ref import verify_ref  # noqa: E402
from kernels.rng import request_key  # noqa: E402

VOCAB = 151_936
HBM_BYTES_PER_S = 3.35e12


def _case(B: int, K: int, T: float, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    target = (torch.randn(B * (K + 1), VOCAB, generator=g) * 3).to(torch.bfloat16).to(device)
    draft = (torch.randn(B * K, VOCAB, generator=g) * 3).to(torch.bfloat16).to(device)
    d = target.view(B, K + 1, VOCAB)[:, :K].float().argmax(-1).reshape(-1)  # mostly accepted drafts
    meta = SamplingMetadata(
        temperature=torch.full((B,), T, device=device),
        top_k=torch.full((B,), -1, dtype=torch.long, device=device),
        top_p=torch.ones(B, device=device),
        key=torch.tensor([request_key(i) for i in range(B)], device=device),
        step=torch.zeros(B, dtype=torch.long, device=device),
    )
    return target, draft, d, [K] * B, meta


def _time(fn, repeats: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="bench/results/kernels.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("not measured: no CUDA device here (Triton on CPU runs in the interpreter; its timings mean nothing)")
        return 0
    from kernels.acceptance import verify_triton

    rows = []
    for B, K in ((32, 3), (256, 7)):
        for T in (0.0, 1.0):
            case = _case(B, K, T, "cuda")
            target, draft = case[0], case[1]
            read = target.numel() * 2 + (draft.numel() * 2 if T > 0 else 0)
            t_tri = _time(lambda c=case: verify_triton(*c), args.repeats)
            t_ref = _time(lambda c=case: verify_ref(*c), max(3, args.repeats // 4))
            med_tri, med_ref = statistics.median(t_tri), statistics.median(t_ref)
            rows.append({
                "requests": B, "drafts": K, "temperature": T,
                "triton_ms_min": min(t_tri), "triton_ms_median": med_tri,
                "ref_ms_min": min(t_ref), "ref_ms_median": med_ref,
                "speedup_median": med_ref / med_tri,
                "hbm_fraction": read / (med_tri / 1e3) / HBM_BYTES_PER_S,
            })
            r = rows[-1]
            print(f"{B:4d} x {K}  T={T}: triton {med_tri:.3f} ms (min {min(t_tri):.3f}), ref {med_ref:.3f} ms, "
                  f"x{r['speedup_median']:.1f}, HBM {100 * r['hbm_fraction']:.0f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "vocab": VOCAB, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
