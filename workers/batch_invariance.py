"""A start-up check that a reduced-precision (bf16/fp16) model's CPU kernels are batch-invariant.

Owns: `rows_independent` (does a row-wise function give each row what it gives that row alone?)
and `invariance_failures`, which probes the kernels every row of a step goes through, at the
model's own shapes, on random inputs: each distinct projection shape (`LoRALinear`, in its
`INVARIANT_ROWS` pieces) and the attention (`invariant_attention` at the model's head layout: every
row of a block against the same query alone, under key padding). The fp32 head of a bf16 model
probes itself when `CausalLM.compute_logits` builds it (one product per row where it fails).

Why: ISD / R-ISD equal AR bit for bit in bf16 only because every row is computed the same whatever
the step's size and the row's place in it (DESIGN §1). That rests on measured properties of
oneDNN's bf16 kernels and MKL's packed sgemm on the CPU they run on (docs/benchmarks.md, item 13),
not on a guarantee: another ISA or library build may differ. The engine runs this once per loaded
model and says so when it fails (greedy ISD may then leave AR's path at near-ties, as fp32 can).
"""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import invariant_attention
from workers.models.linear import LoRALinear


def rows_independent(fn, in_features: int, dtype: torch.dtype, rows: tuple[int, ...] = (2, 3, 7, 9, 17, 33)) -> bool:
    """Whether `fn` ([M, in] -> [M, out]) gives every row bitwise what it gives that row alone, at
    `rows` row counts and at an unaligned start (a probe on random inputs; MKL's packed sgemm has it
    for vocabulary-sized outputs but not for ~100 columns)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(rows) + 1, in_features, generator=g).to(dtype)
    with torch.no_grad():
        alone = [fn(x[i : i + 1]) for i in range(x.shape[0])]
        return all(torch.equal(fn(x[s : s + m])[i : i + 1], alone[s + i]) for m in rows for s in (0, 1) for i in range(m))


def _attention_rows_independent(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Every query row of a prefill-like block (keys padded, 2 requests) equals that query alone."""
    g = torch.Generator().manual_seed(0)
    ctx, lq, b = 5, 40, 2
    q = torch.randn(b, num_heads, ctx + lq, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(b, num_kv_heads, ctx + lq + 9, head_dim, generator=g).to(dtype) for _ in range(2))

    def rows(start: int, n: int, pad: int, batch: int) -> torch.Tensor:  # [Hq, n, D] of request 0
        lk = start + n + pad
        last = start + torch.arange(n)
        mask = (torch.arange(lk)[None, :] <= last[:, None])[None, None].expand(batch, 1, n, lk)
        return invariant_attention(q[:batch, :, start : start + n], k[:batch, :, :lk], v[:batch, :, :lk], mask, 0.125)[0]

    block = rows(ctx, lq, 9, b)
    return all(torch.equal(block[:, j], rows(ctx + j, 1, 0, 1)[:, 0]) for j in range(lq))


def invariance_failures(model: nn.Module) -> list[str]:
    """Names of the kernels of `model` (a reduced-precision CPU model) whose rows depend on the batch;
    empty when every probe holds."""
    cfg = model.config
    dtype = model.lm_head.weight.dtype
    failures, seen = [], set()
    with torch.inference_mode():
        for name, mod in model.named_modules():
            if not isinstance(mod, LoRALinear) or mod is model.lm_head:
                continue
            shape = (mod.in_features, mod.out_features)
            if shape in seen:
                continue
            seen.add(shape)
            if not rows_independent(lambda x, m=mod: m(x), mod.in_features, dtype):
                failures.append(f"{name} {shape}")
        if not _attention_rows_independent(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype):
            failures.append("attention")
    return failures
