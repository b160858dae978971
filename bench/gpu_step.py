"""GPU step time of our engine's forward: AR (1 query row per request) vs ISD N (2N-1 rows per
request: pending + N-1 drafts + N-1 MASKs), I-DLM-8B shapes, random bf16 weights.

    python bench/gpu_step.py                       # CUDA: I-DLM-8B shape, concurrency 1..64
    python bench/gpu_step.py --tiny --device cpu   # same code path, tiny model (a smoke run)

It times exactly what `workers.model_runner.ModelRunner.execute` runs for a decode step:
`AttentionMetadata.build` over paged block tables, `CausalLM.forward` against the paged KV cache
(every request has `--ctx` tokens already cached), and `compute_logits` at the rows that need them
(1 per request in AR, 2N-1 in ISD). Weights are random on the device; nothing is downloaded.

Reports min / median step time per concurrency, the ISD/AR ratio (target: <= 1.5 at concurrency
32), and for AR at concurrency 1 the fraction of the HBM roofline: bytes read per step (weights +
the cached K/V) / step time, against the device's peak bandwidth (target: >= 70%).
Without CUDA (and without --tiny) it prints "not measured" and writes {"measured": false}.
Writes bench/results/gpu_step.json (+ .png when matplotlib is installed). Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# bench/ holds kernels.py, which would shadow the top-level `kernels` package
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from workers.attention import AttentionMetadata  # noqa: E402
from workers.kv_cache import allocate_kv_cache  # noqa: E402
from workers.models.config import ModelConfig  # noqa: E402
from workers.models.transformer import CausalLM  # noqa: E402

# Qwen3-8B / I-DLM-8B shapes (config.json of the released checkpoint).
IDLM_8B = ModelConfig(
    family="qwen3", architecture="SDARForCausalLM", vocab_size=151936, hidden_size=4096,
    intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768, qk_norm=True,
    mask_token_id=151669,
)
TINY = ModelConfig(
    family="qwen3", architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=128,
    intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True,
    mask_token_id=511,
)
# Peak HBM bandwidth (GB/s) by device name.
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
BLOCK = 16


def build_model(cfg: ModelConfig, device: str, dtype: torch.dtype) -> CausalLM:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model = model.to(dtype).eval()
    # rotary frequencies stay fp32 after the dtype cast, as the loader keeps them
    model.rotary.inv_freq = 1.0 / (cfg.rope_theta ** (
        torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
    return model


class StepBench:
    """One paged KV cache holding `max_conc` requests of `ctx` cached tokens each (+ room for a block)."""

    def __init__(self, cfg: ModelConfig, model: CausalLM, ctx: int, max_conc: int, max_q: int, device, dtype):
        self.cfg, self.model, self.ctx, self.device = cfg, model, ctx, device
        per_req = -(-(ctx + max_q) // BLOCK)
        self.kv = allocate_kv_cache(cfg, per_req * max_conc, BLOCK, dtype, device)
        self.tables = [list(range(i * per_req, (i + 1) * per_req)) for i in range(max_conc)]

    @torch.inference_mode()
    def step(self, conc: int, q_len: int) -> None:
        """What the runner does for one decode step: metadata, forward, logits at q_len rows each."""
        meta = AttentionMetadata.build([q_len] * conc, [self.ctx] * conc, self.tables[:conc], BLOCK, self.device)
        T = conc * q_len
        ids = torch.randint(0, self.cfg.vocab_size - 1, (T,), device=self.device)  # [T]
        pos = (self.ctx + torch.arange(q_len, device=self.device)).repeat(conc)  # [T]
        hidden = self.model(ids, pos, kv_caches=self.kv, meta=meta)  # [T, H]
        self.model.compute_logits(hidden)  # [T, V]: every row of a decode block needs logits

    def time(self, conc: int, q_len: int, warmup: int, repeats: int) -> list[float]:
        cuda = self.device.startswith("cuda")
        for _ in range(warmup):
            self.step(conc, q_len)
        out = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.step(conc, q_len)
            if cuda:
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


def bytes_per_step(cfg: ModelConfig, model: CausalLM, conc: int, ctx: int, elem: int) -> int:
    weights = sum(p.numel() for p in model.parameters()) * elem
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ctx * conc * elem
    return weights + kv


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model (checks the code path on CPU)")
    ap.add_argument("--conc", default="1,2,4,8,16,32,64")
    ap.add_argument("--ctx", type=int, default=1024, help="cached tokens per request")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak-gbps", type=float, default=0.0, help="override the device's peak HBM bandwidth")
    ap.add_argument("--out", default=str(RESULTS / "gpu_step.json"))
    a = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    if not a.tiny and not a.device.startswith("cuda"):
        print("gpu_step: not measured: no GPU (CUDA unavailable); run on a CUDA machine, or --tiny --device cpu")
        out.write_text(json.dumps({"measured": False, "reason": "no CUDA device"}, indent=2))
        return

    cfg = TINY if a.tiny else IDLM_8B
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    concs = [int(c) for c in a.conc.split(",")]
    isd_q = 2 * a.stride - 1
    model = build_model(cfg, a.device, dtype)
    bench = StepBench(cfg, model, a.ctx, max(concs), isd_q, a.device, dtype)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    peak = a.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), 0.0)
    rows = []
    print(f"device {name}, model {'tiny' if a.tiny else 'I-DLM-8B shape'} {dtype}, ctx {a.ctx}, ISD N={a.stride}")
    print(f"{'conc':>5} {'AR ms (min/med)':>18} {'ISD ms (min/med)':>18} {'ISD/AR':>7}")
    for c in concs:
        ar = bench.time(c, 1, a.warmup, a.repeats)
        isd = bench.time(c, isd_q, a.warmup, a.repeats)
        row = {"conc": c, "ar_ms_min": min(ar), "ar_ms_median": statistics.median(ar),
               "isd_ms_min": min(isd), "isd_ms_median": statistics.median(isd),
               "isd_over_ar_median": statistics.median(isd) / statistics.median(ar)}
        rows.append(row)
        print(f"{c:>5} {row['ar_ms_min']:>8.2f}/{row['ar_ms_median']:<8.2f} {row['isd_ms_min']:>8.2f}/"
              f"{row['isd_ms_median']:<8.2f} {row['isd_over_ar_median']:>7.2f}")
    c1 = next((r for r in rows if r["conc"] == 1), rows[0])
    nbytes = bytes_per_step(cfg, model, c1["conc"], a.ctx, elem)
    achieved = nbytes / (c1["ar_ms_min"] / 1e3) / 1e9
    roof = {"bytes_per_step": nbytes, "achieved_gbps": achieved, "peak_gbps": peak or None,
            "fraction": achieved / peak if peak else None}
    if peak:
        print(f"AR c={c1['conc']}: {nbytes / 1e9:.2f} GB read per step, {achieved:.0f} GB/s = "
              f"{100 * achieved / peak:.0f}% of {peak:.0f} GB/s (target >= 70%)")
    else:
        print(f"AR c={c1['conc']}: {achieved:.1f} GB/s achieved (no peak bandwidth known for {name!r}: "
              "the roofline fraction is not meaningful here)")
    r32 = next((r for r in rows if r["conc"] == 32), None)
    if r32:
        print(f"ISD/AR step time at concurrency 32: {r32['isd_over_ar_median']:.2f} (target <= 1.5)")
    res = {"measured": a.device.startswith("cuda") and not a.tiny, "device": name, "tiny": a.tiny,
           "dtype": str(dtype), "ctx": a.ctx, "stride": a.stride, "rows": rows, "roofline_c1": roof,
           "torch": torch.__version__}
    out.write_text(json.dumps(res, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(concs, [r["ar_ms_median"] for r in rows], "o-", label="AR (1 row/request)")
        ax.plot(concs, [r["isd_ms_median"] for r in rows], "o-", label=f"ISD N={a.stride} ({isd_q} rows/request)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("step time, median (ms)")
        ax.set_title(f"{name}, {'tiny' if a.tiny else 'I-DLM-8B shape'}, ctx {a.ctx}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
