"""Gated-LoRA training with a cached real prefix: the fast path of the R-ISD objective.

Owns: `RealKV` (per-layer K/V and final hidden states of a training sequence's real rows, computed
once with the frozen base weights) and `mask_rows_loss` (forward + loss of MASK groups against that
cache: hard-label CE, optionally mixed with distillation from the base model's own distributions).

Why this is exact and fast: the gated LoRA applies only at MASK rows, so the real rows' hidden
states and K/V do not depend on any trainable parameter. The packed dense objective of
`training.gated_lora` nevertheless runs (and back-propagates through) the real rows every step.
Here they run once, under `no_grad`, and are cached; a step forwards and back-propagates only the
MASK rows, each of which attends to the cached real K/V of rows 0..t (t = its cut) plus the earlier
MASK rows of its own group -- the same attention pattern as the engine's `[pending, drafts, MASK]`
block and as `gated_lora.pack_example`. With the base frozen, the backward pass computes no weight
gradients for the base either, so a MASK row costs about two forward rows.

MASK row j of the group cut at t sits at position t+1+j and predicts x_{t+2+j}.

Distillation (`distill` > 0): the data are the base model's greedy continuations, so the real row
t+1+j's base distribution p(. | x_0..x_{t+1+j}) is exactly the distribution the MASK row is asked to
reproduce (its argmax is the label). Its full shape -- the runner-up tokens, how close a near-tie is
-- is free here (the real rows' final hidden states are cached with their K/V; one no-grad lm_head
product per MASK row) and carries more per row than the one-hot label, which matters once the data
is seen for a second and third epoch. The per-row loss is (1-distill)*CE + distill*KL(p_base||q).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.models.transformer import CausalLM, RopeTables


@dataclass
class RealKV:
    """Frozen-base K/V of one sequence's real rows."""

    seq: list[int]
    prompt_len: int
    keys: list[torch.Tensor]  # per layer [L, Hkv, D] (after k-norm and rotary)
    values: list[torch.Tensor]  # per layer [L, Hkv, D]
    hidden: torch.Tensor  # [L, H] final (normed) hidden states: compute_logits gives p_base per row


def _qkv(attn, xn: torch.Tensor, cos, sin, rows):
    # xn: [R, H] -> q [R, Hq, D], k/v [R, Hkv, D] (the engine's own projection, norm and rotary)
    return attn.qkv(xn, RopeTables(cos, sin, xn.dtype), rows)


def _attend(attn, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    # q [R, Hq, D], k/v [S, Hkv, D], mask [R, S] bool (None: causal with R == S) -> [R, Hq*D]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=None if mask is None else mask[None, None], is_causal=mask is None,
        scale=attn.scale, enable_gqa=attn.nh != attn.nkv,
    )  # [1, Hq, R, D]
    return o[0].transpose(0, 1).reshape(q.shape[0], -1)


def real_kv(model: CausalLM, seq: list[int], prompt_len: int) -> RealKV:
    """The frozen K/V and hidden states of one sequence's real rows (`real_kv_batch` of one)."""
    return unstack(seq, prompt_len, real_kv_batch(model, [seq])[0], model.lm_head.weight.dtype)


@torch.no_grad()
def real_kv_batch(model: CausalLM, seqs: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`real_kv` of several sequences in one padded forward (right padding cannot reach a real row
    under causal attention). Returns per sequence a cache entry that `unstack` turns back into a
    `RealKV`: ONE stacked K/V tensor [layers, 2, L, Hkv, D] (one dtype cast) and the final normed
    hidden states [L, H]."""
    dev = model.lm_head.weight.device
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, device=dev)
    cos, sin = model.rotary(torch.arange(T, device=dev).repeat(B))
    x = model.model.embed_tokens(ids.view(-1))  # [B*T, H]
    kvs = []
    for layer in model.model.layers:
        a = layer.self_attn
        q, k, v = _qkv(a, layer.input_layernorm(x), cos, sin, None)  # [B*T, heads, D]
        o = F.scaled_dot_product_attention(
            *(t.view(B, T, -1, a.hd).transpose(1, 2) for t in (q, k, v)),
            is_causal=True, scale=a.scale, enable_gqa=a.nh != a.nkv,
        )  # [B, Hq, T, D]
        x = x + a.o_proj(o.transpose(1, 2).reshape(B * T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x), None)
        kvs.append(torch.stack([k.view(B, T, a.nkv, a.hd), v.view(B, T, a.nkv, a.hd)], 1))  # [B, 2, T, Hkv, D]
    full = torch.stack(kvs, 1)  # [B, layers, 2, T, Hkv, D]
    hid = model.model.norm(x).view(B, T, -1)  # [B, T, H]
    return [(full[b, :, :, : len(s)].clone(), hid[b, : len(s)].clone()) for b, s in enumerate(seqs)]


def unstack(seq: list[int], prompt_len: int, entry: tuple[torch.Tensor, torch.Tensor],
            dtype=torch.float32) -> RealKV:
    """A `real_kv_batch` entry (K/V [layers, 2, L, Hkv, D], hidden [L, H]) as a `RealKV` in `dtype`."""
    kv, hid = entry[0].to(dtype), entry[1].to(dtype)
    return RealKV(seq, prompt_len, list(kv[:, 0]), list(kv[:, 1]), hid)


def mask_rows_loss(
    model: CausalLM, kv: RealKV, cuts: list[int], group: int, mask_id: int, decay: float = 0.8,
    distill: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of `group` MASK rows after each cut t (t = index of the last real row they see)."""
    return mask_rows_loss_batch(model, [kv], [cuts], group, mask_id, decay, distill)


def mask_rows_loss_batch(
    model: CausalLM, kvs: list[RealKV], cuts: list[list[int]], group: int, mask_id: int, decay: float = 0.8,
    distill: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`mask_rows_loss` of several sequences in ONE forward: their real K/V are concatenated on the
    key axis and each MASK row only sees its own sequence's rows (a block-diagonal mask), so on a GPU
    a batch costs about one sequence's kernel launches. The loss is the mean over sequences of each
    sequence's decay-weighted mean CE -- the same value as averaging `mask_rows_loss` per sequence.
    With `distill` in (0, 1], each row's CE becomes (1-distill)*CE + distill*KL(p_base || q), p_base
    the frozen base's distribution at the real row t+1+j (see the module docstring)."""
    if not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill: {distill} is not in [0, 1]")
    dev = model.lm_head.weight.device
    keep = [(kv, c) for kv, c in zip(kvs, cuts) if c]
    if not keep:
        raise ValueError("cuts: every sequence of the batch has no cut")
    lens = [len(kv.seq) for kv, _ in keep]
    off = torch.tensor([0] + lens[:-1], device=dev).cumsum(0)  # [B] key offset of each sequence
    ncut = torch.tensor([len(c) for _, c in keep], device=dev)
    B = len(keep)
    t = torch.tensor([x for _, c in keep for x in c], device=dev).repeat_interleave(group)  # [R] cut (local)
    C = t.numel() // group
    j = torch.arange(group, device=dev).repeat(C)  # [R] offset inside the group
    g = torch.arange(C, device=dev).repeat_interleave(group)  # [R] group index (batch-wide)
    sid = torch.arange(B, device=dev).repeat_interleave(ncut * group)  # [R] sequence of each row
    pos = t + 1 + j
    tgt_idx = t + 2 + j
    L = torch.tensor(lens, device=dev)[sid]  # [R] own sequence length
    seqs = torch.tensor([x for kv, _ in keep for x in kv.seq], device=dev)  # [sum L]
    # (a target past its own sequence's end gets no loss; the clamp only keeps the gather in range)
    labels = torch.where(tgt_idx < L, seqs[(off[sid] + tgt_idx).clamp(max=seqs.numel() - 1)], -100)
    # keys: every sequence's real rows, then all MASK rows. Real key k belongs to sequence kseq[k]
    # at local position kpos[k]; a MASK row sees real rows 0..t of its own sequence and the MASK
    # rows of its own group with offset <= j.
    kseq = torch.arange(B, device=dev).repeat_interleave(torch.tensor(lens, device=dev))  # [sum L]
    kpos = torch.arange(seqs.numel(), device=dev) - off[kseq]
    mask = torch.cat([
        (kseq[None, :] == sid[:, None]) & (kpos[None, :] <= t[:, None]),
        (g[None, :] == g[:, None]) & (j[None, :] <= j[:, None]),
    ], dim=1)  # [R, sum L + R]
    R = t.numel()
    cos, sin = model.rotary(pos)
    rows = torch.arange(R, device=dev)  # every row is a MASK row: LoRA on everywhere
    x = model.model.embed_tokens(torch.full((R,), mask_id, device=dev))  # [R, H]
    for li, layer in enumerate(model.model.layers):
        a = layer.self_attn
        q, k, v = _qkv(a, layer.input_layernorm(x), cos, sin, rows)
        k = torch.cat([kv.keys[li] for kv, _ in keep] + [k], 0)
        v = torch.cat([kv.values[li] for kv, _ in keep] + [v], 0)
        x = x + a.o_proj(_attend(a, q, k, v, mask), rows)
        x = x + layer.mlp(layer.post_attention_layernorm(x), rows)
    sel = labels != -100
    logits = model.compute_logits(model.model.norm(x[sel])).float()  # [R', V]
    q_log = F.log_softmax(logits, -1)  # [R', V] once, for the CE and the KL
    ce = F.nll_loss(q_log, labels[sel], reduction="none")
    if distill > 0:
        with torch.no_grad():  # teacher: real row t+1+j of the same sequence (frozen base)
            hid = torch.cat([kv.hidden for kv, _ in keep])  # [sum L, H]
            p_log = F.log_softmax(model.compute_logits(hid[(off[sid] + pos)[sel]]).float(), -1)  # [R', V]
        kl = F.kl_div(q_log, p_log, reduction="none", log_target=True).sum(-1)  # [R'] KL(p_base || q)
        ce = (1 - distill) * ce + distill * kl
    w = decay ** j[sel].float()
    s_sel = sid[sel]
    num = torch.zeros(B, device=dev).index_add(0, s_sel, ce * w)  # [B] weighted CE sum per sequence
    den = torch.zeros(B, device=dev).index_add(0, s_sel, w)
    has = den > 0
    loss = (num[has] / den[has]).mean()
    with torch.no_grad():
        hit = (logits.argmax(-1) == labels[sel]).float()
        js = j[sel]
        stats = {f"acc{o}": hit[js == o].mean().item() for o in range(min(group, 4)) if (js == o).any()}
        if distill > 0:  # the teacher's argmax is the label wherever the data are greedy base output
            stats["teacher_agree"] = (p_log.argmax(-1) == labels[sel]).float().mean().item()
    return loss, stats
