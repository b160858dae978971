"""The CPU GEMM backends side by side on this machine: oneDNN's packed product, MKL's packed sgemm
and F.linear (MKL unpacked), per SmolLM2 projection shape and row count, and whole AR engines
forced to each backend (and `auto`, the engine's measured choice per row count) next to HF
transformers.

    .venv/bin/python bench/cpu_gemm.py [--conc 1,4,16] [--repeats 4] [--out bench/results/cpu_gemm.json]

The per-shape table keeps weights hot in cache; the cold chain (every product of a forward, each
layer its own weights) is the one that predicts engine steps.

Why it exists: which backend is faster at a few rows depends on the CPU (workers/cpu_gemm.py). A
benchmark, never a test; time it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.engine import prompts_for, waves  # noqa: E402
from workers import LLM, EngineConfig, SamplingParams  # noqa: E402
from workers.engine import load_engine_model  # noqa: E402
from workers.loader import resolve_model  # noqa: E402
from workers.models.linear import PACKED_LINEAR, pack_weight  # noqa: E402

BACKENDS = ("torch", "mkl", "onednn")  # F.linear, MKL packed, oneDNN packed


def product(backend: str, x: torch.Tensor, w: torch.Tensor, packed) -> torch.Tensor:
    return F.linear(x, w) if backend == "torch" else PACKED_LINEAR[backend](x, packed, None)


def packs(w: torch.Tensor) -> dict:
    return {b: pack_weight(b, w) for b in BACKENDS[1:]} | {"torch": None}


# SmolLM2-135M's products: (out, in)
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}


def per_shape(rows=(1, 2, 3, 4, 8, 16)) -> dict:
    """Microseconds per product (best of 5 timed loops; weights hot in cache, unlike a forward)."""
    def best_us(f, reps):
        f()
        out = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            out = min(out, (time.perf_counter() - t0) / reps)
        return 1e6 * out

    g = torch.Generator().manual_seed(0)
    res = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g)
        p = packs(w)
        reps = 10 if name == "head" else 100
        res[name] = {}
        for m in rows:
            x = torch.randn(m, k, generator=g)
            res[name][m] = {b: best_us(lambda x=x, b=b, w=w, p=p: product(b, x, w, p[b]), reps) for b in BACKENDS}
        print(name, " | ".join(f"M{m}: " + " ".join(f"{b} {us:.0f}" for b, us in v.items())
                               for m, v in res[name].items()), flush=True)
    return res


def cold_chain(rows=(1, 2, 3, 4, 5, 7, 8, 16, 32, 64), layers: int = 30, repeats: int = 7) -> dict:
    """Milliseconds for the products of a whole SmolLM2 forward (30 layers' own weights, then the
    head), so weights stream from memory as in the engine, unlike `per_shape`'s hot loops. Median
    of `repeats`, backends interleaved."""
    g = torch.Generator().manual_seed(0)
    per_layer = [SHAPES[k] for k in ("qkv", "o", "gate_up", "down")]
    ws = [[torch.randn(n, k, generator=g) * 0.02 for n, k in per_layer] for _ in range(layers)]
    ws.append([torch.randn(*SHAPES["head"], generator=g) * 0.02])
    packed = [[packs(w) for w in layer] for layer in ws]

    def forward(m: int, backend: str) -> None:
        xs = {k: torch.randn(m, k, generator=g) for k in (576, 1536)}
        for layer, players in zip(ws, packed):
            for w, p in zip(layer, players):
                product(backend, xs[w.shape[1]], w, p[backend])

    times: dict[str, dict[int, list[float]]] = {b: {m: [] for m in rows} for b in BACKENDS}
    with torch.inference_mode():
        for r in range(repeats):
            for m in rows:
                for b in BACKENDS if r % 2 else BACKENDS[::-1]:
                    t0 = time.perf_counter()
                    forward(m, b)
                    times[b][m].append(time.perf_counter() - t0)
    res = {b: {m: 1e3 * statistics.median(v) for m, v in per.items()} for b, per in times.items()}
    for b, per in res.items():
        print(f"cold chain {b}: " + " ".join(f"M{m} {v:.1f} ms" for m, v in per.items()), flush=True)
    return res


def engines(concs, repeats: int, max_tokens: int) -> dict:
    """AR engines on one loaded model, each with IDLM_CPU_GEMM set around its calls, and HF generate;
    repeats interleaved, the order reversed every other repeat. tokens/s median and best."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load_engine_model(EngineConfig(model="smollm2", mode="ar"))
    kw = dict(mode="ar", max_num_seqs=max(concs), max_num_batched_tokens=4096, kv_cache_tokens=max(concs) * (max_tokens + 200))
    os.environ["IDLM_CPU_GEMM"] = "auto"
    ours = {"auto": LLM("smollm2", loaded=loaded, **kw)}
    ours.update({b: LLM("smollm2", loaded=loaded, **kw) for b in BACKENDS})
    gemm_rows = dict(sorted(loaded.model.gemm_rows.items()))
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32).eval()
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    res = {"auto_gemm_rows": gemm_rows}
    for c in concs:
        ws = waves(prompts_for(tok, max(c, 4)), c)

        def run_ours(backend, ws=ws):
            os.environ["IDLM_CPU_GEMM"] = backend
            for w in ws:
                ours[backend].generate(w, sp)
            os.environ["IDLM_CPU_GEMM"] = "auto"

        def run_hf(ws=ws):
            with torch.inference_mode():
                for w in ws:
                    b = tok.pad({"input_ids": w}, return_tensors="pt", padding=True)
                    hf.generate(**b, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                pad_token_id=tok.eos_token_id)

        runs = [(f"ours-ar-{b}", lambda b=b: run_ours(b)) for b in ours] + [("hf", run_hf)]
        for _, f in runs:
            f()  # warm-up
        walls = {name: [] for name, _ in runs}
        for r in range(repeats):
            for name, f in runs if r % 2 == 0 else runs[::-1]:
                t0 = time.perf_counter()
                f()
                walls[name].append(time.perf_counter() - t0)
        n = sum(len(w) for w in ws) * max_tokens
        res[c] = {name: {"tok_s_median": n / statistics.median(v), "tok_s_max": n / min(v), "walls": v} for name, v in walls.items()}
        print(f"C={c}: " + ", ".join(f"{k} {v['tok_s_median']:.1f} ({v['tok_s_max']:.1f})" for k, v in res[c].items()), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conc", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_gemm.json"))
    a = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    out = {"command": " ".join([Path(sys.executable).name] + sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"{cpu}, {out['threads']} threads, torch {torch.__version__}")
    out["per_shape_us"] = per_shape()
    out["cold_chain_ms"] = cold_chain()
    out["engines"] = engines([int(c) for c in a.conc.split(",")], a.repeats, a.max_tokens)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
