"""Benchmark (not a test): the Triton kernels on a GPU. Acceptance kernels vs the torch reference,
and paged attention (2D and split-KV) vs the SDPA gather path, with effective HBM bandwidth.

    python bench/kernels.py [--repeats 20] [--only acceptance|attention] [--out bench/results/kernels.json]

Owns: the kernel timing protocol.

Acceptance: vocab 151,936 (Qwen3 / I-DLM), bf16 logits, 32 requests x 3 drafts (N=4) and 256 x 7
(N=8), greedy and sampled (T=1, and T=0.8 with top-p 0.95, whose truncation is a torch sort in both
implementations). Reports min/median ms over repeats after a warm-up, the speed-up over the
reference, and the fraction of HBM bandwidth reached: bytes of logits read / median time, against
3.35 TB/s (H100 SXM). Bytes read: every target row (greedy; drafts are the target argmax so no
request stops early) or every target and draft row plus the two rows of the final race (sampled).
It also checks that Triton and the reference agree.

Paged attention: I-DLM-8B heads (32 q / 8 KV, head_dim 128), bf16, block 16, random block tables;
C requests in {1, 4, 16, 32, 64} x context L in {1k, 4k, 16k} x q_len in {1 (AR), 7 (ISD N=4)},
plus prefill chunks. Per case: median and p90 ms (`triton.testing.do_bench`, L2 flushed between
runs) of the default launch (split-KV when `default_num_splits` says so), of the 2D kernel when
that differs, and of the SDPA gather path (`workers.attention`, L <= 4k); effective GB/s = (K/V
bytes of every key + q and out bytes) / median time and its fraction of the device's peak; the
first call's time (JIT compile); max |diff| against the fp32 reference.

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

from idlm_kernels import SamplingMetadata  # noqa: E402
from idlm_kernels.acceptance_ref import verify_ref  # noqa: E402
from idlm_kernels.paged_attention import default_num_splits, paged_attention_triton  # noqa: E402
from idlm_kernels.paged_attention_ref import paged_attention_ref  # noqa: E402
from idlm_kernels.rng import request_key  # noqa: E402

VOCAB = 151_936
HBM_BYTES_PER_S = 3.35e12  # H100 SXM5
SHAPES = ((32, 3), (256, 7))
SAMPLING = ((0.0, 1.0), (1.0, 1.0), (0.8, 0.95))  # (temperature, top_p)
HQ, HKV, HEAD_DIM, BLOCK = 32, 8, 128, 16  # I-DLM-8B attention
ATTN_DECODE = [(c, L, q) for q in (1, 7) for L in (1024, 4096, 16384) for c in (1, 4, 16, 32, 64)]
ATTN_PREFILL = [(1, 512, 512), (1, 4096, 512), (4, 2048, 256)]  # (requests, context incl. the chunk, chunk)
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


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


def _attn_case(C: int, L: int, q_len: int, device: str):
    """C requests of L keys each (the last q_len of them are the new rows), bf16, random blocks."""
    g = torch.Generator(device=device).manual_seed(C * 7919 + L + q_len)
    width = -(-L // BLOCK)
    tables = torch.randperm(C * width, generator=g, device=device).view(C, width).int()
    kc = torch.randn(C * width * BLOCK, HKV, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
    vc = torch.randn(C * width * BLOCK, HKV, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
    q = torch.randn(C * q_len, HQ, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
    qsl = torch.arange(C + 1, device=device, dtype=torch.int32) * q_len
    return q, kc, vc, tables, torch.full((C,), L, dtype=torch.int32, device=device), qsl


def _bench_ms(fn) -> tuple[float, float]:
    import triton.testing

    med, p90 = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.9])
    return med, p90


def _attention_row(C: int, L: int, q_len: int, peak_gbps: float) -> dict:
    from workers.attention import AttentionMetadata
    from workers.attention import paged_attention as gather_attention

    scale = HEAD_DIM**-0.5
    case = _attn_case(C, L, q_len, "cuda")
    q, kc, vc, bt, sl, qsl = case
    nbytes = C * L * HKV * HEAD_DIM * 2 * 2 + 2 * q.numel() * 2  # K and V of every key + q and out
    auto = default_num_splits(C, HKV, q_len, L, q.device)
    r = {"requests": C, "context": L, "q_len": q_len, "bytes": nbytes, "auto_num_splits": auto}
    t0 = time.perf_counter()
    out = paged_attention_triton(*case, BLOCK, scale, max_query_len=q_len, max_seq_len=L)
    torch.cuda.synchronize()
    r["first_call_s"] = time.perf_counter() - t0
    ref = paged_attention_ref(*case, BLOCK, scale, out_dtype=torch.float32)
    r["max_abs_diff_vs_fp32_ref"] = float((out.float() - ref).abs().max())
    for name, splits in [("auto", auto)] + ([("2d", 1)] if auto != 1 else []):
        med, p90 = _bench_ms(lambda s=splits: paged_attention_triton(*case, BLOCK, scale, max_query_len=q_len,
                                                                     num_splits=s))
        r[f"{name}_ms_median"], r[f"{name}_ms_p90"] = med, p90
        r[f"{name}_gbps"] = nbytes / (med / 1e3) / 1e9
        r[f"{name}_hbm_fraction"] = r[f"{name}_gbps"] / peak_gbps if peak_gbps else None
    if L <= 4096:  # the gather path pads every request's whole history: bounded here
        meta = AttentionMetadata.build([q_len] * C, [L - q_len] * C, bt.tolist(), BLOCK, "cuda")
        k_new, v_new = kc[meta.slot_mapping].clone(), vc[meta.slot_mapping].clone()  # a step's own rows, rewritten
        med, p90 = _bench_ms(lambda: gather_attention(q, k_new, v_new, kc, vc, meta, scale))
        r["gather_ms_median"], r["gather_ms_p90"] = med, p90
        r["speedup_over_gather"] = med / r["auto_ms_median"]
    return r


def bench_attention(peak_gbps: float) -> list[dict]:
    rows = []
    for C, L, q_len in ATTN_DECODE + ATTN_PREFILL:
        r = _attention_row(C, L, q_len, peak_gbps)
        torch.cuda.empty_cache()
        rows.append(r)
        frac = f"{100 * r['auto_hbm_fraction']:.0f}%" if peak_gbps else "n/a"
        print(f"attention C={C:3d} L={L:6d} q={q_len:3d}: auto (splits {r['auto_num_splits']:2d}) "
              f"{r['auto_ms_median']:.3f} ms p90 {r['auto_ms_p90']:.3f}, {r['auto_gbps']:.0f} GB/s ({frac})"
              + (f", 2d {r['2d_ms_median']:.3f} ms" if "2d_ms_median" in r else "")
              + (f", gather {r['gather_ms_median']:.3f} ms (x{r['speedup_over_gather']:.1f})" if "gather_ms_median" in r else "")
              + f", max|d| {r['max_abs_diff_vs_fp32_ref']:.2g}, first call {r['first_call_s']:.2f} s", flush=True)
    return rows


def bench_acceptance(repeats: int) -> list[dict]:
    from idlm_kernels.acceptance import verify_triton

    rows = []
    for B, K in SHAPES:
        for T, top_p in SAMPLING:
            case = _case(B, K, T, top_p, "cuda")
            got, want = verify_triton(*case), verify_ref(*case)
            agree = float(((got[0] == want[0]).all(1) & (got[1] == want[1])).float().mean())
            t_tri = _time(lambda c=case: verify_triton(*c), repeats)
            t_ref = _time(lambda c=case: verify_ref(*c), max(3, repeats // 4))
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
                  f"equal {100 * agree:.2f}%", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--only", choices=["acceptance", "attention"], default=None)
    ap.add_argument("--out", default="bench/results/kernels.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        why = "no CUDA device" if not torch.cuda.is_available() else "TRITON_INTERPRET=1"
        msg = f"not measured: {why} (Triton on CPU runs in the interpreter; its timings mean nothing)"
        print(msg)
        out.write_text(json.dumps({"status": msg, "vocab": VOCAB, "rows": [], "attention": {"rows": []}}, indent=2) + "\n")
        return 0
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), 0.0)
    res = {"status": "measured", "device": name, "torch": torch.__version__, "vocab": VOCAB,
           "hbm_bytes_per_s": HBM_BYTES_PER_S, "rows": [], "attention": {"peak_gbps": peak or None, "rows": []}}
    import triton

    res["triton"] = triton.__version__
    if args.only != "attention":
        res["rows"] = bench_acceptance(args.repeats)
        out.write_text(json.dumps(res, indent=2) + "\n")  # written as it goes: a later failure keeps these
    if args.only != "acceptance":
        res["attention"]["rows"] = bench_attention(peak)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
