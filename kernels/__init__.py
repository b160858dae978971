"""Kernels for ISD verification and sampling, each a Triton kernel beside a plain-torch reference.

Owns: the dispatcher. The engine calls only `verify` and `sample` here. Backend choice: Triton on
CUDA, the torch reference elsewhere; `IDLM_KERNELS=triton|torch` forces one (Triton on CPU needs
`TRITON_INTERPRET=1`, set before triton is imported).
"""

from __future__ import annotations

import os

import torch

from kernels.acceptance_ref import PLACEHOLDER, SamplingMetadata, processed_probs, sample_ref, verify_ref

__all__ = ["PLACEHOLDER", "SamplingMetadata", "backend", "processed_probs", "sample", "verify"]


def backend(device: torch.device | str) -> str:
    forced = os.environ.get("IDLM_KERNELS", "").strip().lower()
    if forced in ("torch", "triton"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"IDLM_KERNELS: must be 'triton', 'torch' or 'auto', got {forced!r}")
    return "triton" if torch.device(device).type == "cuda" and _triton_available() else "torch"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def verify(target_logits, draft_logits, draft_token_ids, num_drafts, meta):
    if backend(target_logits.device) == "triton":
        from kernels.acceptance import verify_triton

        return verify_triton(target_logits, draft_logits, draft_token_ids, num_drafts, meta)
    return verify_ref(target_logits, draft_logits, draft_token_ids, num_drafts, meta)


def sample(logits, req_index, stream, meta, purpose):
    """One token per row from the request's processed distribution (argmax for greedy rows)."""
    if meta.all_greedy:  # every backend's greedy rows are the argmax: skip the softmax work
        return logits.argmax(-1)
    if backend(logits.device) == "triton":
        from kernels.acceptance import sample_triton

        return sample_triton(logits, req_index, stream, meta, purpose)
    return sample_ref(logits, req_index, stream, meta, purpose)[0]
