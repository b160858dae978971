"""The CPU GEMM backend per row count (workers.cpu_gemm, `LoRALinear.torch_rows`): chosen by
measurement, applied to every product of a step, exact where it must be (R-ISD clean rows)."""

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import tiny_loaded
from tests.workers.test_lean_forward import _flat_batch, base_and_gated
from workers import LLM
from workers.cpu_gemm import apply_torch_rows, choose_torch_rows
from workers.models.linear import LoRALinear

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"), reason="no oneDNN linear")


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.setenv("IDLM_CPU_GEMM", "auto")


def test_choice_on_a_synthetic_cpu():
    """MKL 30% faster at 1-2 rows, 5% at 3 (within the margin: not taken), slower from 4."""
    applied = []
    speed = {1: 0.7, 2: 0.7, 3: 0.95, 4: 1.2, 5: 1.3}

    def time_rows(m):
        return 0.01 * m * (speed[m] if m in applied[-1] else 1.0)

    rows = choose_torch_rows(time_rows, applied.append, max_rows=5)
    assert rows == frozenset({1, 2}) and applied[-1] == rows
    assert max(max(a) for a in applied if a) == 3  # stopped at the first row count MKL did not win
    applied.clear()
    assert choose_torch_rows(lambda m: 0.01, applied.append) == frozenset()  # a tie: oneDNN stays


def test_torch_rows_route_each_row_count(auto):
    lin = LoRALinear(64, [("a", 48), ("b", 32)])
    lin.torch_rows = frozenset({1, 2})
    packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach())
    with torch.inference_mode():
        for m in (1, 2, 3, 7):
            x = torch.randn(m, 64)
            want = F.linear(x, lin.weight) if m in lin.torch_rows else \
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            assert torch.equal(lin(x), want), m


def test_clean_rows_stay_bitwise_the_base_product_on_either_backend(auto):
    """A step whose row count runs on F.linear takes the unmerged LoRA path, so its clean rows are
    still bit for bit the base model's at that row count (what keeps R-ISD lossless)."""
    loaded = tiny_loaded("qwen3", lora_rank=4)
    rows_in_step = _flat_batch(loaded)[0].shape[0]
    for rows in (frozenset(), frozenset({rows_in_step})):
        apply_torch_rows(loaded.model, rows)
        base, gated, n_clean = base_and_gated(loaded)
        assert torch.equal(gated[:n_clean], base[:n_clean]), rows
        assert (gated[n_clean:] - base[n_clean:]).abs().amax(-1).gt(0).all()


def test_the_engine_measures_once_per_loaded_model(auto, monkeypatch):
    loaded = tiny_loaded("llama")
    first = LLM(loaded=loaded, mode="ar", kv_cache_tokens=4096).engine
    rows = loaded.model.torch_gemm_rows
    assert isinstance(rows, frozenset) and rows <= set(range(1, 9))
    assert all(mod.torch_rows == rows for mod in loaded.model.modules() if isinstance(mod, LoRALinear))
    calls = []
    monkeypatch.setattr(type(first.runner), "time_rows", lambda self, r, m=0: calls.append(r) or 0.001)
    LLM(loaded=loaded, mode="ar", adaptive_stride=False, kv_cache_tokens=4096)
    assert calls == [] and loaded.model.torch_gemm_rows is rows  # a second engine reuses the choice
    monkeypatch.setenv("IDLM_CPU_GEMM", "onednn")
    other = tiny_loaded("llama")
    LLM(loaded=other, mode="ar", kv_cache_tokens=4096)
    assert calls == [] and not hasattr(other.model, "torch_gemm_rows")  # forced: nothing measured
