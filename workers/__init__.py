"""idlm-serve engine: a compact paged-KV engine for AR, ISD and R-ISD decoding (runs without Ray)."""

from workers.config import EngineConfig
from workers.outputs import CompletionResult, RequestMetrics, RequestOutput
from workers.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "SamplingParams", "RequestOutput", "RequestMetrics", "CompletionResult"]


def __getattr__(name: str):
    # Lazy so that `import workers.config` (e.g. from the cluster ingress) does not import torch.
    if name == "LLM":
        from workers.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from workers.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
