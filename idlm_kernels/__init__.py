"""Kernels for ISD verification and sampling and for paged attention, each a Triton kernel beside a
plain-torch reference.

Owns: the dispatcher. The engine calls only `verify`, `sample`, `paged_attention` and `write_kv`
here. Backend choice: Triton on CUDA, the torch reference elsewhere; `IDLM_KERNELS=triton|torch`
forces one for verification and sampling, `IDLM_ATTENTION=triton|torch` for attention (Triton on CPU
needs `TRITON_INTERPRET=1`, set before this package is imported: it imports triton).
"""

from __future__ import annotations

import os

import torch

# The Triton module `idlm_kernels/paged_attention.py` shares its name with the entry point
# `idlm_kernels.paged_attention` below. Importing a submodule binds it as an attribute of the package
# (on its first import only), so it is imported here, once, before the function rebinds the name;
# `from idlm_kernels.paged_attention import ...` keeps working. (This imports triton with the package.)
from idlm_kernels import paged_attention as _paged_attention_module  # noqa: E402, F401
from idlm_kernels.acceptance_ref import PLACEHOLDER, SamplingMetadata, processed_probs, sample_ref, verify_ref
from idlm_kernels.paged_attention_ref import paged_attention_ref, write_kv_ref  # noqa: E402

__all__ = [
    "PLACEHOLDER", "SamplingMetadata", "attention_backend", "backend", "paged_attention", "processed_probs",
    "sample", "verify", "write_kv",
]


def _choose(var: str, device: torch.device | str) -> str:
    forced = os.environ.get(var, "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{var}: must be 'triton', 'torch' or 'auto', got {forced!r}")
    return "triton" if torch.device(device).type == "cuda" and _triton_available() else "torch"


def backend(device: torch.device | str) -> str:
    """Verification / sampling backend (`IDLM_KERNELS`)."""
    return _choose("IDLM_KERNELS", device)


def attention_backend(device: torch.device | str) -> str:
    """Paged-attention backend (`IDLM_ATTENTION`). The engine takes its kernel path when this is
    `triton` and keeps its SDPA gather path (`workers.attention`) otherwise."""
    return _choose("IDLM_ATTENTION", device)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def verify(target_logits, draft_logits, draft_token_ids, num_drafts, meta):
    if backend(target_logits.device) == "triton":
        from idlm_kernels.acceptance import verify_triton

        return verify_triton(target_logits, draft_logits, draft_token_ids, num_drafts, meta)
    return verify_ref(target_logits, draft_logits, draft_token_ids, num_drafts, meta)


def sample(logits, req_index, stream, meta, purpose):
    """One token per row from the request's processed distribution (argmax for greedy rows)."""
    if meta.all_greedy:  # every backend's greedy rows are the argmax: skip the softmax work
        return logits.argmax(-1)
    if backend(logits.device) == "triton":
        from idlm_kernels.acceptance import sample_triton

        return sample_triton(logits, req_index, stream, meta, purpose)
    return sample_ref(logits, req_index, stream, meta, purpose)[0]


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size, scale, **hints):
    """Causal attention of a ragged flat batch against a paged KV cache; semantics and shapes in
    `idlm_kernels/paged_attention_ref.py`. `hints` (Triton only): `max_query_len`, `max_seq_len`,
    `num_splits` (see `idlm_kernels.paged_attention.paged_attention_triton`)."""
    if attention_backend(q.device) == "triton":
        return _paged_attention_module.paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens,
                                                              query_start_loc, block_size, scale, **hints)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size, scale)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Row t of k / v into cache slot `slot_mapping[t]` (negative: skipped)."""
    if attention_backend(k.device) == "triton":
        return _paged_attention_module.write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
