"""Engine configuration: one dataclass per concern, validated on construction.

Owns: `EngineConfig` (what the engine serves and how: model source, decoding mode, ISD stride,
KV budget, batch limits). Validation raises `ValueError` naming the offending field; no I/O here
(model files are read by `workers.loader`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["ar", "isd", "risd"]
MODES: tuple[str, ...] = ("ar", "isd", "risd")
MAX_STRIDE = 16


def _require(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {msg}")


@dataclass
class EngineConfig:
    """Everything one engine instance needs. Fields are plain values so the cluster layer can
    build it from a pydantic model or a YAML dict."""

    model: str = "smollm2"
    """Model source: an alias (`smollm2`), an HF directory, or a `.gguf` file."""
    mode: Mode = "isd"
    """`ar`: plain decoding (stride forced to 1). `isd`: introspective strided decoding with the
    model's own MASK predictions. `risd`: base model + gated LoRA adapter active at MASK rows."""
    stride: int = 4
    """ISD stride N: each forward verifies up to N-1 drafts and proposes N-1 new ones (1..16)."""
    adaptive_stride: bool = True
    """Each round pick every request's stride in 1..`stride` from a step-cost model and its
    acceptance (workers.stride); False: always `stride`. Lossless either way."""
    stride_guard: bool = True
    """Adaptive stride only: per load level, measure the committed tokens/s of the policy's choice
    against every request at stride 1 and run the faster (workers.draft_guard), so drafting that
    the cost model wrongly thinks pays is found and dropped. False: the policy's choice alone."""
    draft_anchors: Literal["auto", "last", "every"] = "auto"
    """Where a verify round's MASK rows go. `last`: one group after the last draft, so its drafts
    survive only if every draft is accepted (a rejection is followed by a cold round). `every`: one
    group after each real row of the block (the pending token and each draft), so whichever draft
    is rejected, the group anchored at the last accepted row proposes the next drafts and every
    round verifies drafts (n^2 rows at stride n instead of 2n-1; workers.isd). `auto`: on the SDPA
    attention path (CPU) with the adaptive stride, `last` where the CPU GEMM runs 3-row and 4-row
    products on different backends (`every`'s stride-2 block would leave the cheap path), else `every`
    (workers.draft_layout); `every` on that path with a fixed stride; `last` on the Triton kernel
    path, which has no per-group masks. Lossless either way."""
    adapter: str | None = None
    """PEFT directory of the gated LoRA adapter (`risd`). None with `smollm2` uses the demo adapter."""
    mask_token_id: int | None = None
    """Overrides the MASK id read from the model / adapter config."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    enforce_eager: bool = False
    """CUDA only: never capture CUDA graphs (every step eager). Decode steps are otherwise replayed
    from graphs captured per (batch bucket, rows per request) on first use (workers.cuda_graphs)."""
    kv_block_size: int = 16
    """Tokens per KV page."""
    num_kv_blocks: int | None = None
    """KV budget in pages. None: derived from `kv_cache_tokens`."""
    kv_cache_tokens: int = 65536
    """KV budget in tokens when `num_kv_blocks` is None."""
    max_num_seqs: int = 64
    """Most requests in one forward."""
    max_num_batched_tokens: int = 2048
    """Token budget of one forward (prefill chunks + ISD blocks)."""
    max_model_len: int | None = None
    """Context length limit; None: the model's own."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks of committed tokens across requests (shared system prompts, later
    turns, n samples of one prompt); output is token-for-token the same with it off."""
    seed: int = 0
    """Seeds the per-request seeds of requests that give none."""
    max_logprobs: int = 20
    """Most top alternatives a request may ask for (`logprobs`, `prompt_logprobs`)."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    """`raw_logprobs`: log_softmax of the model's logits (vLLM's default). `processed_logprobs`: of
    the distribution sampled from (processors, temperature, top-k / top-p; greedy: processors)."""
    grammar_drafts: Literal["masked", "unmasked"] = "masked"
    """Structured outputs: `masked` draws a constrained request's drafts from its grammar-masked
    MASK rows (higher acceptance, CPU mask work per draft); `unmasked` from the raw rows (off-grammar
    drafts are then rejected by verification). Both are exact."""
    grammar_cache_mb: int = 256
    """Memory bound of the replica's compiled-grammar cache (LRU)."""
    grammar_compile_timeout_s: float = 30.0
    """A grammar still compiling after this long fails its request (only that one)."""
    trust_cache: bool = True
    """Reuse converted model files in the cache directory."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.mode in MODES, "mode", f"must be one of {MODES}, got {self.mode!r}")
        _require(
            isinstance(self.stride, int) and 1 <= self.stride <= MAX_STRIDE,
            "stride",
            f"must be an integer in 1..{MAX_STRIDE}, got {self.stride!r}",
        )
        if self.mode == "ar":
            # NOTE: AR is ISD with N=1: no drafts, no MASK rows.
            self.stride = 1
        _require(isinstance(self.adaptive_stride, bool), "adaptive_stride", f"must be a boolean, got {self.adaptive_stride!r}")
        _require(isinstance(self.stride_guard, bool), "stride_guard", f"must be a boolean, got {self.stride_guard!r}")
        _require(self.draft_anchors in ("auto", "last", "every"), "draft_anchors",
                 f"must be 'auto', 'last' or 'every', got {self.draft_anchors!r}")
        _require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
                 f"must be a boolean, got {self.enable_prefix_caching!r}")
        _require(self.dtype in ("float32", "bfloat16", "float16"), "dtype", f"unsupported {self.dtype!r}")
        _require(isinstance(self.enforce_eager, bool), "enforce_eager", f"must be a boolean, got {self.enforce_eager!r}")
        _require(self.kv_block_size >= 1, "kv_block_size", "must be >= 1")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", "must be >= 1")
        _require(self.kv_cache_tokens >= 1, "kv_cache_tokens", "must be >= 1")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _require(
            self.max_num_batched_tokens >= 2 * self.stride,
            "max_num_batched_tokens",
            f"must be >= 2*stride ({2 * self.stride}) so one ISD block fits a step",
        )
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")
        _require(isinstance(self.max_logprobs, int) and self.max_logprobs >= 0, "max_logprobs", "must be an integer >= 0")
        _require(self.grammar_drafts in ("masked", "unmasked"), "grammar_drafts",
                 f"must be 'masked' or 'unmasked', got {self.grammar_drafts!r}")
        _require(isinstance(self.grammar_cache_mb, int) and self.grammar_cache_mb >= 1, "grammar_cache_mb",
                 "must be an integer >= 1")
        _require(self.grammar_compile_timeout_s > 0, "grammar_compile_timeout_s", "must be > 0")
        _require(self.logprobs_mode in ("raw_logprobs", "processed_logprobs"), "logprobs_mode",
                 f"must be 'raw_logprobs' or 'processed_logprobs', got {self.logprobs_mode!r}")

    def cache_namespace(self, cache_salt: str | None = None) -> bytes:
        """Root digest of this engine's block-hash chains (workers.block_hash); the ingress and the
        router compute the same from the same config."""
        from workers.block_hash import namespace_root

        return namespace_root(self.model, self.adapter if self.mode == "risd" else None, self.kv_block_size, cache_salt)

    @property
    def num_blocks(self) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return -(-self.kv_cache_tokens // self.kv_block_size)
