"""Benchmark (not a test): Triton acceptance kernels vs the torch reference on a GPU.

    python bench/kernels.py [--repeats 20] [--out bench/results/kernels.json]

Owns: the kernel timing protocol. Shapes: vocab 151,936 (Qwen3 / I-DLM), bf16 logits,
32 requests x 3 drafts (N=4) and 256 x 7 (N=8), greedy and sampled (T=1, and T=0.8 with
top-p 0.95, whose truncation is a torch sort in both implementations). Reports min/median ms over
repeats after a warm-up, the speed-up over the reference, and the fraction of HBM bandwidth reached:
bytes of logits read / median time, against 3.35 TB/s (H100 SXM). Bytes read: every target row
(greedy; drafts are the target argmax so no request stops early) or every target and draft row
plus the two rows of the final race (sampled). It also checks that Triton and the reference agree.

Without CUDA, or with TRITON_INTERPRET=1, it refuses to time Triton (the interpreter says nothing
about GPU speed), prints "not measured" and writes that to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
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
HBM_BYTES_PER_S = 3.35e12  # H100 SXM5
SHAPES = ((32, 3), (256, 7))
SAMPLING = ((0.0, 1.0), (1.0, 1.0), (0.8, 0.95))  # (temperature, top_p)


def _case(B: int, K: int, T: float, top_p: float, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    target = (torch.randn(B * (K + 1), VOCAB, generator=g) * 3).to(torch.bfloat16).to(device)  # [B(K+1), V]
    draft = (torch.randn(B * K, VOCAB, generator=g) * 3).to(torch.bfloat16).to(device)  # [BK, V]
    d = target.view(B, K + 1, VOCAB)[:, :K].float().argmax(-1).reshape(-1)  # [BK] drafts = target argmax
    meta = SamplingMetadata(
        temperature=torch.full((B,), T, device=device),
        top_k=torch.full((B,), -1, dtype=torch.long, device=device),
        top_p=torch.full((B,), top_p, device=device),
        key=torch.tensor([request_key(i) for i in range(B)], device=device),
        step=torch.zeros(B, dtype=torch.long, device=device),
    )
    return target, draft, d, [K] * B, meta


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up (compilation, allocator)
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _bytes_read(B: int, K: int, T: float) -> int:
    row = VOCAB * 2  # bf16
    if T <= 0:
        return B * (K + 1) * row
    return (B * (K + 1) + B * K + 2 * B) * row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="bench/results/kernels.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        why = "no CUDA device" if not torch.cuda.is_available() else "TRITON_INTERPRET=1"
        msg = f"not measured: {why} (Triton on CPU runs in the interpreter; its timings mean nothing)"
        print(msg)
        out.write_text(json.dumps({"status": msg, "vocab": VOCAB, "rows": []}, indent=2) + "\n")
        return 0
    from kernels.acceptance import verify_triton

    rows = []
    for B, K in SHAPES:
        for T, top_p in SAMPLING:
            case = _case(B, K, T, top_p, "cuda")
            got, want = verify_triton(*case), verify_ref(*case)
            agree = float(((got[0] == want[0]).all(1) & (got[1] == want[1])).float().mean())
            t_tri = _time(lambda c=case: verify_triton(*c), args.repeats)
            t_ref = _time(lambda c=case: verify_ref(*c), max(3, args.repeats // 4))
            med_tri, med_ref = statistics.median(t_tri), statistics.median(t_ref)
            r = {
                "requests": B, "drafts": K, "temperature": T, "top_p": top_p,
                "triton_ms_min": min(t_tri), "triton_ms_median": med_tri,
                "ref_ms_min": min(t_ref), "ref_ms_median": med_ref,
                "speedup_median": med_ref / med_tri,
                "bytes_read": _bytes_read(B, K, T),
                "hbm_fraction": _bytes_read(B, K, T) / (med_tri / 1e3) / HBM_BYTES_PER_S,
                "requests_equal_to_reference": agree,
            }
            rows.append(r)
            print(f"{B:4d} x {K}  T={T} top_p={top_p}: triton {med_tri:.3f} ms (min {min(t_tri):.3f}), "
                  f"ref {med_ref:.3f} ms, x{r['speedup_median']:.1f}, HBM {100 * r['hbm_fraction']:.0f}%, "
                  f"equal {100 * agree:.2f}%")
    out.write_text(json.dumps({"status": "measured", "device": torch.cuda.get_device_name(), "vocab": VOCAB,
                               "hbm_bytes_per_s": HBM_BYTES_PER_S, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
