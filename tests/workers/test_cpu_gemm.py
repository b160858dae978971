"""The CPU GEMM backend per row count (workers.cpu_gemm, `LoRALinear.gemm_rows`): chosen by
measurement, applied to every product of a step, exact where it must be (R-ISD clean rows)."""

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import tiny_loaded
from tests.workers.test_lean_forward import _flat_batch, base_and_gated
from workers import LLM
from workers.cpu_gemm import apply_gemm_rows, choose_gemm_rows
from workers.models.linear import MKL_PACK_ROWS, LoRALinear, mkl_linear, onednn_linear, pack_weight

pytestmark = pytest.mark.skipif(pack_weight("onednn", torch.ones(2, 2)) is None or pack_weight("mkl", torch.ones(2, 2)) is None,
                                reason="no oneDNN or MKL packed linear in this torch build")


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.setenv("IDLM_CPU_GEMM", "auto")


def test_choice_on_a_synthetic_cpu():
    """F.linear fastest at 1-2 rows, MKL packed at 3-4 and 6 (5% ahead of oneDNN: taken, margin 3%),
    neither at 8 (2%: not taken, one loss), MKL again at 12, then oneDNN twice: the probes stop
    there. The counts between two probes take the upper probe's backend."""
    applied = []
    speed = {"torch": {1: 0.6, 2: 0.6, 3: 0.9, 4: 1.3, 6: 1.3, 8: 1.3, 12: 1.3, 16: 1.3, 24: 1.3, 32: 0.1},
             "mkl": {1: 0.7, 2: 0.7, 3: 0.7, 4: 0.7, 6: 0.95, 8: 0.98, 12: 0.9, 16: 1.0, 24: 1.1, 32: 0.5}}

    def time_rows(m):
        backend = applied[-1].get(m, "onednn")
        return 0.01 * m * speed.get(backend, {}).get(m, 1.0)

    rows = choose_gemm_rows(time_rows, applied.append, grid=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
    want = {1: "torch", 2: "torch"} | dict.fromkeys(range(3, 7), "mkl") | dict.fromkeys(range(9, 13), "mkl")
    assert rows == want and applied[-1] == rows
    assert max(max(a) for a in applied if a) == 24  # stopped after the second probe in a row oneDNN won
    # F.linear, 30% behind oneDNN at 4 rows (more than `drop`), was not timed at larger counts
    assert not any(a.get(m) == "torch" for a in applied for m in (6, 8, 12, 16, 24))
    applied.clear()
    assert choose_gemm_rows(lambda m: 0.01, applied.append) == {}  # a tie: oneDNN stays


def test_one_mkl_pack_serves_every_row_count():
    """What `mkl_linear` relies on: MKL's packed weight, built once for `MKL_PACK_ROWS` rows, gives
    the right product at any row count, bit for bit what a pack built for another count gives."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((96, 64), (960, 576), (576, 1536)):
        w = torch.randn(n, k, generator=g) * 0.02
        ours = pack_weight("mkl", w)
        other = (torch.ops.mkl._mkl_reorder_linear_weight(w, 3), ours[1])
        for m in (1, 2, 3, 4, 7, 8, 13, MKL_PACK_ROWS, 33):
            x = torch.randn(m, k, generator=g)
            y = mkl_linear(x, ours, None)
            torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
            if m > 1:
                assert torch.equal(y, mkl_linear(x, other, None)), (n, k, m)


def test_gemm_rows_route_each_row_count(auto):
    lin = LoRALinear(64, [("a", 48), ("b", 32)])
    lin.gemm_rows = {1: "torch", 2: "mkl", 3: "mkl"}
    w = lin.weight.detach()
    mkl, dnn = pack_weight("mkl", w), pack_weight("onednn", w)
    want = {"torch": lambda x: F.linear(x, w), "mkl": lambda x: mkl_linear(x, mkl, None),
            "onednn": lambda x: onednn_linear(x, dnn, None)}
    with torch.inference_mode():
        for m in (1, 2, 3, 7):
            x = torch.randn(m, 64)
            assert torch.equal(lin(x), want[lin.gemm_rows.get(m, "onednn")](x)), m


def test_clean_rows_stay_bitwise_the_base_product_on_either_backend(auto):
    """Whichever backend a step's row count runs on, its clean rows are bit for bit the base
    model's at that row count (what keeps R-ISD lossless)."""
    loaded = tiny_loaded("qwen3", lora_rank=4)
    rows_in_step = _flat_batch(loaded)[0].shape[0]
    for rows in ({}, {rows_in_step: "mkl"}, {rows_in_step: "torch"}):
        apply_gemm_rows(loaded.model, rows)
        base, gated, n_clean = base_and_gated(loaded)
        assert torch.equal(gated[:n_clean], base[:n_clean]), rows
        assert (gated[n_clean:] - base[n_clean:]).abs().amax(-1).gt(0).all()


def test_the_engine_measures_once_per_loaded_model(auto, monkeypatch):
    loaded = tiny_loaded("llama")
    first = LLM(loaded=loaded, mode="ar", kv_cache_tokens=4096).engine
    rows = loaded.model.gemm_rows
    assert isinstance(rows, dict) and set(rows) <= set(range(1, 33)) and set(rows.values()) <= {"mkl", "torch"}
    assert all(mod.gemm_rows == rows for mod in loaded.model.modules() if isinstance(mod, LoRALinear))
    calls = []
    monkeypatch.setattr(type(first.runner), "time_rows", lambda self, r, m=0: calls.append(r) or 0.001)
    LLM(loaded=loaded, mode="ar", adaptive_stride=False, kv_cache_tokens=4096)
    assert calls == [] and loaded.model.gemm_rows is rows  # a second engine reuses the choice
    monkeypatch.setenv("IDLM_CPU_GEMM", "onednn")
    other = tiny_loaded("llama")
    LLM(loaded=other, mode="ar", kv_cache_tokens=4096)
    assert calls == [] and not hasattr(other.model, "gemm_rows")  # forced: nothing measured
