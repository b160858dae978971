"""Gated-LoRA training with a cached real prefix: the fast path of the R-ISD objective.

Owns: `RealKV` (per-layer K/V of a training sequence's real rows, computed once with the frozen
base weights) and `mask_rows_loss` (forward + loss of MASK groups against that cache).

Why this is exact and fast: the gated LoRA applies only at MASK rows, so the real rows' hidden
states and K/V do not depend on any trainable parameter. The packed dense objective of
`training.gated_lora` nevertheless runs (and back-propagates through) the real rows every step.
Here they run once, under `no_grad`, and are cached; a step forwards and back-propagates only the
MASK rows, each of which attends to the cached real K/V of rows 0..t (t = its cut) plus the earlier
MASK rows of its own group -- the same attention pattern as the engine's `[pending, drafts, MASK]`
block and as `gated_lora.pack_example`. With the base frozen, the backward pass computes no weight
gradients for the base either, so a MASK row costs about two forward rows.

MASK row j of the group cut at t sits at position t+1+j and predicts x_{t+2+j}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.models.transformer import CausalLM, _apply_rope


@dataclass
class RealKV:
    """Frozen-base K/V of one sequence's real rows."""

    seq: list[int]
    prompt_len: int
    keys: list[torch.Tensor]  # per layer [L, Hkv, D] (after k-norm and rotary)
    values: list[torch.Tensor]  # per layer [L, Hkv, D]


def _qkv(attn, xn: torch.Tensor, cos, sin, rows: torch.Tensor | None):
    # xn: [R, H] -> q [R, Hq, D], k/v [R, Hkv, D]
    q = attn.q_proj(xn, rows).view(-1, attn.nh, attn.hd)
    k = attn.k_proj(xn, rows).view(-1, attn.nkv, attn.hd)
    v = attn.v_proj(xn, rows).view(-1, attn.nkv, attn.hd)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


def _attend(attn, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    # q [R, Hq, D], k/v [S, Hkv, D], mask [R, S] bool (None: causal with R == S) -> [R, Hq*D]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=None if mask is None else mask[None, None], is_causal=mask is None,
        scale=attn.scale, enable_gqa=attn.nh != attn.nkv,
    )  # [1, Hq, R, D]
    return o[0].transpose(0, 1).reshape(q.shape[0], -1)


@torch.no_grad()
def real_kv(model: CausalLM, seq: list[int], prompt_len: int) -> RealKV:
    dev = model.lm_head.weight.device
    ids = torch.tensor(seq, device=dev)
    cos, sin = model.rotary(torch.arange(len(seq), device=dev))
    x = model.model.embed_tokens(ids)  # [L, H]
    keys, values = [], []
    for layer in model.model.layers:
        a = layer.self_attn
        q, k, v = _qkv(a, layer.input_layernorm(x), cos, sin, None)
        x = x + a.o_proj(_attend(a, q, k, v, None))
        x = x + layer.mlp(layer.post_attention_layernorm(x), None)
        keys.append(k)
        values.append(v)
    return RealKV(seq, prompt_len, keys, values)


def mask_rows_loss(
    model: CausalLM, kv: RealKV, cuts: list[int], group: int, mask_id: int, decay: float = 0.8
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of `group` MASK rows after each cut t (t = index of the last real row they see)."""
    dev = model.lm_head.weight.device
    L, C = len(kv.seq), len(cuts)
    R = C * group
    t = torch.tensor(cuts, device=dev).repeat_interleave(group)  # [R] cut of each row
    j = torch.arange(group, device=dev).repeat(C)  # [R] offset inside the group
    g = torch.arange(C, device=dev).repeat_interleave(group)  # [R] group index
    pos = t + 1 + j
    tgt_idx = t + 2 + j
    seq = torch.tensor(kv.seq, device=dev)
    labels = torch.where(tgt_idx < L, seq[tgt_idx.clamp(max=L - 1)], -100)
    # [R, L + R]: real rows 0..t, then own group's MASK rows with offset <= j
    mask = torch.cat([
        torch.arange(L, device=dev)[None, :] <= t[:, None],
        (g[None, :] == g[:, None]) & (j[None, :] <= j[:, None]),
    ], dim=1)
    cos, sin = model.rotary(pos)
    rows = torch.arange(R, device=dev)  # every row is a MASK row: LoRA on everywhere
    x = model.model.embed_tokens(torch.full((R,), mask_id, device=dev))  # [R, H]
    for li, layer in enumerate(model.model.layers):
        a = layer.self_attn
        q, k, v = _qkv(a, layer.input_layernorm(x), cos, sin, rows)
        k = torch.cat([kv.keys[li], k], 0)
        v = torch.cat([kv.values[li], v], 0)
        x = x + a.o_proj(_attend(a, q, k, v, mask), rows)
        x = x + layer.mlp(layer.post_attention_layernorm(x), rows)
    sel = labels != -100
    logits = model.compute_logits(model.model.norm(x[sel])).float()  # [R', V]
    ce = F.cross_entropy(logits, labels[sel], reduction="none")
    w = decay ** j[sel].float()
    loss = (ce * w).sum() / w.sum()
    with torch.no_grad():
        hit = (logits.argmax(-1) == labels[sel]).float()
        js = j[sel]
        stats = {f"acc{o}": hit[js == o].mean().item() for o in range(min(group, 4)) if (js == o).any()}
    return loss, stats

