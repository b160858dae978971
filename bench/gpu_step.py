"""GPU step time of our engine's forward: AR (1 query row per request) vs ISD N (2N-1 rows per
request: pending + N-1 drafts + N-1 MASKs), I-DLM-8B shapes, random bf16 weights, on three paths:
CUDA graphs (the engine's default on CUDA), the same kernel path eager (`enforce_eager`), and the
former SDPA gather path (`IDLM_ATTENTION=torch`) as the baseline.

    python bench/gpu_step.py                       # CUDA: I-DLM-8B shape, concurrency 1..64
    python bench/gpu_step.py --tiny --device cpu   # same code path, tiny model (a smoke run)
    python bench/gpu_step.py --lora-rank 32        # R-ISD: gated LoRA on the MASK rows

A step is one call of the engine's own `workers.model_runner.ModelRunner.execute` on a
`SchedulerOutput` of decode items, so it includes everything the engine pays per step: the host-side
row lists and the packed step tensor, the device-side attention metadata, `CausalLM.forward` against
the paged KV cache (every request has `--ctx` tokens already cached), and the fp32 logits at the
rows that need them (pending in AR; pending + drafts + MASKs in ISD). The `host ms` column is the
host-side input preparation alone (`build_step_batch` + `pack_step`, part of every step). Weights
are random on the device (bf16 on CUDA, fp32 on CPU); nothing is downloaded. Graph captures happen
in the warm-up steps (one graph per concurrency and row shape).

Reports min / median step time per concurrency and path, the ISD/AR ratio on the default path
(target: <= 1.5 at concurrency 32), the agreement of each path's ISD logits with the graph path's
(max |diff|, argmax agreement), and for AR at concurrency 1 the fraction of the HBM roofline: bytes
that must be read per step (every weight but the embedding table, of which only T rows are
gathered, + the cached K/V) / step time, against the device's peak bandwidth (H100 3.35 TB/s,
H200 4.8 TB/s; target >= 70%). Without CUDA (and without --tiny) it prints "not measured: no GPU"
and writes {"measured": false}. Writes bench/results/gpu_step.json (--tiny: gpu_step_tiny.json) +
.png when matplotlib is installed. Never part of the tests.
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
# bench/ holds kernels.py, which would shadow a top-level `kernels` package (e.g. HF hub kernels)
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from workers.batch_layout import build_step_batch  # noqa: E402
from workers.kernel_attention import pack_step  # noqa: E402
from workers.model_runner import ModelRunner  # noqa: E402
from workers.models.config import ModelConfig  # noqa: E402
from workers.models.transformer import CausalLM, Rotary  # noqa: E402
from workers.request import Request  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402
from workers.scheduler import ScheduledItem, SchedulerOutput  # noqa: E402

# Qwen3-8B / I-DLM-8B shapes (config.json of the released checkpoint): untied, q/k-norm.
IDLM_8B = ModelConfig(
    family="qwen3", architecture="SDARForCausalLM", vocab_size=151936, hidden_size=4096,
    intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768, qk_norm=True,
    tie_word_embeddings=False, mask_token_id=151669,
)
TINY = ModelConfig(
    family="qwen3", architecture="Qwen3ForCausalLM", vocab_size=512, hidden_size=128,
    intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True,
    max_position_embeddings=32768, mask_token_id=511,
)
# Peak HBM bandwidth (GB/s) by device name (SXM parts).
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
# CPU: a nominal figure only so the roofline line is exercised; the fraction means nothing there.
CPU_NOMINAL_GBPS = 20.0
BLOCK = 16  # EngineConfig.kv_block_size default
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(cfg: ModelConfig, device: str, dtype: torch.dtype, lora_rank: int = 0) -> CausalLM:
    """Random weights allocated directly on `device` in `dtype` (no fp32 copy of an 8B model)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.rotary = torch.nn.Module()  # as workers.loader: rebuilt for real after the dtype cast
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    # inv_freq stays fp32, as the loader keeps it
    model.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings).to(device)
    if lora_rank:
        model.add_lora(lora_rank, 2.0 * lora_rank, LORA_TARGETS, init_b_zero=False)
    return model.eval()


class StepBench:
    """`max_conc` decode requests, each with `ctx` tokens in the paged KV cache (+ room for a block),
    stepped through the engine's `ModelRunner.execute`."""

    def __init__(self, cfg: ModelConfig, model: CausalLM, ctx: int, max_conc: int, max_q: int,
                 device: str, dtype: torch.dtype, lora: bool):
        self.cfg, self.ctx = cfg, ctx
        per_req = -(-(ctx + max_q) // BLOCK)
        self.runner = ModelRunner(model, cfg, per_req * max_conc, BLOCK, cfg.mask_token_id,
                                  use_lora_gate=lora, device=device, dtype=dtype, max_num_seqs=max_conc)
        g = torch.Generator().manual_seed(0)
        self.reqs = []
        for i in range(max_conc):
            # prompt = ctx cached tokens + `pending` (the last token never has KV when a step starts)
            toks = torch.randint(0, cfg.vocab_size - 1, (ctx + 1 + max_q,), generator=g).tolist()
            r = Request(request_id=str(i), prompt_token_ids=toks[: ctx + 1], params=SamplingParams(), rng_key=i)
            r.num_computed = ctx
            r.block_table = list(range(i * per_req, (i + 1) * per_req))
            r.drafts = toks[ctx + 1:]  # up to N-1 used
            self.reqs.append(r)

    def sched(self, conc: int, n_drafts: int, n_masks: int) -> SchedulerOutput:
        return SchedulerOutput(items=[ScheduledItem(r, num_real=1, num_drafts=n_drafts, num_masks=n_masks, final=True)
                                      for r in self.reqs[:conc]])

    def time(self, fn, cuda: bool, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def time_step(self, conc: int, n_side: int, cuda: bool, warmup: int, repeats: int) -> list[float]:
        """n_side drafts and n_side MASK rows per request (0: AR)."""
        s = self.sched(conc, n_side, n_side)
        return self.time(lambda: self.runner.execute(s), cuda, warmup, repeats)

    def time_host(self, conc: int, n_side: int, cuda: bool, warmup: int, repeats: int) -> list[float]:
        """Host-side input preparation of a step: the row lists and the packed step tensor."""
        s = self.sched(conc, n_side, n_side)
        width = max(len(r.block_table) for r in self.reqs[:conc])
        mask = self.cfg.mask_token_id
        return self.time(lambda: pack_step(build_step_batch(s.items, mask), width), False, warmup, repeats)

    def set_path(self, path: str) -> None:
        """graph | eager (kernel path) | gather (SDPA gather path) | default (the runner's own)."""
        r = self.runner
        if not hasattr(self, "_graphs"):
            self._graphs, self._kernel = r.graphs, r.kernel_path
        r.kernel_path = self._kernel if path in ("graph", "eager", "default") else False
        r.graphs = self._graphs if path in ("graph", "default") else None

    def logits(self, conc: int, n_side: int) -> torch.Tensor:
        return self.runner.execute(self.sched(conc, n_side, n_side)).logits


def measure(bench: StepBench, c: int, paths: list[str], n_side: int, cuda: bool, warmup: int, repeats: int) -> dict:
    """One concurrency on every path; the top-level figures are the first path's."""
    row: dict = {"conc": c, "paths": {}}
    first = None
    for path in paths:
        bench.set_path(path)
        ar = bench.time_step(c, 0, cuda, warmup, repeats)
        isd = bench.time_step(c, n_side, cuda, warmup, repeats)
        lg = bench.logits(c, n_side)
        first = lg if first is None else first
        r = {"ar_ms_min": min(ar), "ar_ms_median": statistics.median(ar), "isd_ms_min": min(isd),
             "isd_ms_median": statistics.median(isd), "isd_over_ar_median": statistics.median(isd) / statistics.median(ar),
             "isd_over_ar_min": min(isd) / min(ar), "ar_ms": ar, "isd_ms": isd,
             "isd_logits_max_abs_diff_vs_first": float((lg - first).abs().max()),
             "isd_argmax_agreement_vs_first": float((lg.argmax(-1) == first.argmax(-1)).float().mean())}
        row["paths"][path] = r
        if path == paths[0]:
            row.update({k: v for k, v in r.items() if not k.endswith("_vs_first")})
            row["host_ms_median_isd"] = statistics.median(bench.time_host(c, n_side, cuda, warmup, repeats))
        print(f"{c:>5} {path:>7} {r['ar_ms_min']:>8.2f}/{r['ar_ms_median']:<8.2f} {r['isd_ms_min']:>8.2f}/"
              f"{r['isd_ms_median']:<8.2f} {r['isd_over_ar_median']:>7.2f} {row['host_ms_median_isd']:>8.3f} "
              f"{r['isd_logits_max_abs_diff_vs_first']:>16.3g}", flush=True)
    bench.set_path(paths[0])
    return row


def bytes_per_step(cfg: ModelConfig, model: CausalLM, conc: int, ctx: int, q_len: int, kv_elem: int) -> int:
    """Bytes that must come from memory once per step: every weight except the embedding table
    (only T rows of it are gathered) + the K/V of every key position, cached and new."""
    emb = model.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    weights += conc * q_len * emb.shape[1] * emb.element_size()
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (ctx + q_len) * conc * kv_elem
    return weights + kv


def not_measured(out: Path, reason: str) -> None:
    print(f"gpu_step: not measured: no GPU ({reason}); run on a CUDA machine, or --tiny --device cpu for a smoke run")
    out.write_text(json.dumps({"measured": False, "reason": reason}, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model (checks the code path on CPU)")
    ap.add_argument("--conc", default="1,2,4,8,16,32,64")
    ap.add_argument("--ctx", type=int, default=1024, help="cached tokens per request")
    ap.add_argument("--stride", type=int, default=4, help="ISD N: N-1 drafts + N-1 MASKs after pending")
    ap.add_argument("--lora-rank", type=int, default=0, help="R-ISD: gated LoRA of this rank on the MASK rows")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-baselines", action="store_true", help="CUDA: time the graph path only (no eager, no gather)")
    ap.add_argument("--peak-gbps", type=float, default=0.0, help="override the device's peak HBM bandwidth (GB/s)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_step[_tiny].json)")
    a = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(a.out or RESULTS / ("gpu_step_tiny.json" if a.tiny else "gpu_step.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    cuda = a.device.startswith("cuda")
    if not a.tiny and not (cuda and torch.cuda.is_available()):
        not_measured(out, "no CUDA device")
        return
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_step: --device cuda but CUDA is not available")

    cfg = TINY if a.tiny else IDLM_8B
    dtype = torch.bfloat16 if cuda else torch.float32
    concs = [int(c) for c in a.conc.split(",")]
    n_side = a.stride - 1
    isd_q = 2 * a.stride - 1
    model = build_model(cfg, a.device, dtype, a.lora_rank)
    bench = StepBench(cfg, model, a.ctx, max(concs), isd_q, a.device, dtype, lora=a.lora_rank > 0)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    if a.peak_gbps:
        peak, peak_src = a.peak_gbps, "--peak-gbps"
    elif cuda:
        peak = next((v for k, v in PEAK_GBPS.items() if k in name), 0.0)
        peak_src = "device name" if peak else "unknown device"
    else:
        peak, peak_src = CPU_NOMINAL_GBPS, "nominal CPU figure, not meaningful"
    label = "tiny" if a.tiny else "I-DLM-8B shape"
    mode = f"R-ISD (gated LoRA r={a.lora_rank})" if a.lora_rank else "ISD"
    if not cuda:
        print("gpu_step: not measured: no GPU; this is a CPU smoke run of the same code path, not a GPU figure")
    print(f"device {name}, model {label} {str(dtype).replace('torch.', '')}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, ctx {a.ctx}, {mode} N={a.stride} "
          f"({isd_q} rows/request), block {BLOCK}, {a.warmup} warmup + {a.repeats} repeats")
    paths = ["graph", "eager", "gather"] if cuda and not a.no_baselines else ["default"]
    if cuda and bench.runner.graphs is None:
        raise SystemExit("gpu_step: the runner has no CUDA graphs (IDLM_ATTENTION=torch?); unset it")
    print(f"paths: {', '.join(paths)} (the first is the default and is what the ratios use)")
    print(f"{'conc':>5} {'path':>7} {'AR ms min/med':>17} {'ISD ms min/med':>17} {'ISD/AR':>7} {'host ms':>8} "
          f"{'max|d| vs first':>16}")
    rows = [measure(bench, c, paths, n_side, cuda, a.warmup, a.repeats) for c in concs]
    c1 = next((r for r in rows if r["conc"] == 1), rows[0])
    nbytes = bytes_per_step(cfg, model, c1["conc"], a.ctx, 1, bench.runner.kv_caches[0][0].element_size())
    achieved = nbytes / (c1["ar_ms_min"] / 1e3) / 1e9
    frac = achieved / peak if peak else None
    roof = {"conc": c1["conc"], "bytes_per_step": nbytes, "achieved_gbps": achieved, "peak_gbps": peak or None,
            "peak_source": peak_src, "fraction": frac, "target": 0.70,
            "met": (frac >= 0.70) if (frac is not None and cuda) else None}
    note = "" if cuda else "  [CPU smoke run: NOT MEANINGFUL]"
    if peak:
        print(f"roofline, AR c={c1['conc']}: {nbytes / 1e9:.4g} GB read per step / {c1['ar_ms_min']:.2f} ms = "
              f"{achieved:.1f} GB/s = {100 * frac:.1f}% of {peak:.0f} GB/s ({peak_src}; target >= 70%){note}")
    else:
        print(f"roofline, AR c={c1['conc']}: {achieved:.1f} GB/s achieved; no peak bandwidth known for {name!r} "
              "(pass --peak-gbps)")
    r32 = next((r for r in rows if r["conc"] == 32), None)
    target32 = None
    if r32:
        target32 = {"isd_over_ar_median": r32["isd_over_ar_median"], "target": 1.5,
                    "met": (r32["isd_over_ar_median"] <= 1.5) if cuda else None}
        print(f"ISD/AR step time at concurrency 32: {r32['isd_over_ar_median']:.2f} (target <= 1.5){note}")
    res = {"measured": cuda and not a.tiny, "device": name, "tiny": a.tiny, "model": label,
           "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                    "num_heads", "num_kv_heads", "head_dim", "qk_norm",
                                                    "tie_word_embeddings")},
           "dtype": str(dtype), "ctx": a.ctx, "stride": a.stride, "isd_rows_per_request": isd_q,
           "lora_rank": a.lora_rank, "block_size": BLOCK, "warmup": a.warmup, "repeats": a.repeats,
           "paths": paths, "cuda_graphs": paths[0] == "graph", "rows": rows, "roofline_ar_c1": roof, "isd_over_ar_c32": target32,
           "torch": torch.__version__, "command": " ".join(["python", "bench/gpu_step.py", *(argv or sys.argv[1:])])}
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for path in paths:
        ax.plot(concs, [r["paths"][path]["ar_ms_median"] for r in rows], "o-", label=f"AR, {path}")
        ax.plot(concs, [r["paths"][path]["isd_ms_median"] for r in rows], "s--", label=f"{mode} N={a.stride}, {path}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("step time, median (ms)")
    ax.set_title(f"{name}, {label}, ctx {a.ctx}" + ("" if cuda else " (CPU smoke, not a GPU figure)"), fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
