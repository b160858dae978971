"""bench/gpu_step.py is a benchmark, not a test: this only checks that its code path (our model,
paged KV cache and attention metadata at AR and ISD block shapes) runs, on a tiny model, and that
without CUDA it reports "not measured". No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "bench" / "gpu_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_tiny_run_writes_rows(tmp_path, lora_rank):
    out = tmp_path / "g.json"
    _load().main(["--tiny", "--device", "cpu", "--conc", "1,2", "--ctx", "40", "--warmup", "1", "--repeats", "1",
                  "--lora-rank", str(lora_rank), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["measured"] is False and res["tiny"] is True and res["lora_rank"] == lora_rank
    assert res["roofline_ar_c1"]["met"] is None  # a CPU run never claims a GPU target
    assert [r["conc"] for r in res["rows"]] == [1, 2]
    assert res["paths"] == ["default"] and res["cuda_graphs"] is False  # CPU: the runner's own (SDPA) path
    assert all(r["ar_ms_min"] > 0 and r["isd_ms_min"] > 0 and r["host_ms_median_isd"] > 0 for r in res["rows"])
    assert all(r["paths"]["default"]["isd_logits_max_abs_diff_vs_first"] == 0 for r in res["rows"])


def test_without_cuda_not_measured(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    out = tmp_path / "g.json"
    _load().main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == {"measured": False, "reason": "no CUDA device"}
