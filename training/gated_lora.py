"""Gated-LoRA self-distillation objective for R-ISD (DESIGN.md §1).

The base model is frozen; LoRA deltas apply only at MASK rows. A training sequence is a greedy
AR response of the base model (prompt + response). At several cut points t (x_t = last real row
the engine would feed) a group of G MASK tokens is appended at positions t+1..t+G; MASK j must
predict x_{t+2+j} -- the base model's own greedy continuation (the bonus token x_{t+1} comes from
the real row x_t). All groups are packed after the real tokens in one row, with a dense mask:
real rows are causal among themselves, a MASK group sees the real rows 0..t and its own earlier
MASK rows (strictly causal, exactly as in the engine's block), never other groups.
Because attention inside a group is causal, a group of G = 7 trains every stride N <= 8 at once.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pack_example(
    seq: list[int], prompt_len: int, cuts: list[int], group: int, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ids [T], positions [T], dense mask [T,T] (True = attend), lora rows [T], labels [T]
    (-100 where no loss). `cuts` are indices t of the last real row before each MASK group."""
    L = len(seq)
    T = L + group * len(cuts)
    ids = torch.full((T,), mask_id, dtype=torch.long)
    ids[:L] = torch.tensor(seq)
    pos = torch.empty(T, dtype=torch.long)
    pos[:L] = torch.arange(L)
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    lora = torch.zeros(T, dtype=torch.bool)
    labels = torch.full((T,), -100, dtype=torch.long)
    for g, t in enumerate(cuts):
        s = L + g * group
        pos[s : s + group] = torch.arange(t + 1, t + 1 + group)
        mask[s : s + group, : t + 1] = True
        mask[s : s + group, s : s + group] = torch.ones(group, group, dtype=torch.bool).tril()
        lora[s : s + group] = True
        for j in range(group):
            k = t + 2 + j
            if k < L:
                labels[s + j] = seq[k]
    return ids, pos, mask, lora, labels


def sample_cuts(prompt_len: int, L: int, k: int, rng: random.Random) -> list[int]:
    lo, hi = max(prompt_len - 1, 0), L - 3  # need at least x_{t+2} inside the sequence
    if hi < lo:
        return []
    cand = list(range(lo, hi + 1))
    return sorted(rng.sample(cand, min(k, len(cand))))


def collate(examples, group: int, mask_id: int, cuts_per_seq: int, rng: random.Random):
    """examples: list of (seq, prompt_len). Returns padded batch tensors."""
    packed = []
    for seq, plen in examples:
        cuts = sample_cuts(plen, len(seq), cuts_per_seq, rng)
        if cuts:
            packed.append(pack_example(seq, plen, cuts, group, mask_id))
    T = max(p[0].shape[0] for p in packed)
    B = len(packed)
    ids = torch.full((B, T), mask_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    lora = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (i, p, m, lo, la) in enumerate(packed):
        n = i.shape[0]
        ids[b, :n], pos[b, :n], mask[b, :n, :n], lora[b, :n], labels[b, :n] = i, p, m, lo, la
        mask[b, n:, :] = False
        mask[b, torch.arange(n, T), torch.arange(n, T)] = True  # padding rows attend to themselves
    return ids, pos, mask, lora, labels


def position_weights(group: int, decay: float = 0.8) -> torch.Tensor:
    return torch.tensor([decay**j for j in range(group)])


def loss_fn(model, batch, group: int, decay: float = 0.8) -> tuple[torch.Tensor, dict]:
    ids, pos, mask, lora, labels = batch
    h = model(ids, pos, dense_mask=mask, lora_mask=lora)
    sel = labels != -100
    logits = model.compute_logits(h[sel]).float()
    tgt = labels[sel]
    ce = F.cross_entropy(logits, tgt, reduction="none")
    # offset j of each MASK row inside its group (rows of a group are contiguous, group-aligned)
    L_real = (~lora).sum(-1, keepdim=True)  # real rows come first in every packed row
    col = torch.arange(ids.shape[1]).expand_as(ids)
    off = ((col - L_real) % group)[sel]
    w = position_weights(group, decay)[off]
    loss = (ce * w).sum() / w.sum()
    with torch.no_grad():
        acc = (logits.argmax(-1) == tgt).float()
        stats = {f"acc{j}": acc[off == j].mean().item() for j in range(min(group, 3)) if (off == j).any()}
    return loss, stats


def prepare_model(model, rank: int = 32, alpha: float = 64.0):
    for p in model.parameters():
        p.requires_grad_(False)
    model.add_lora(rank, alpha, TARGETS, init_b_zero=True)
    return lora_params(model)


def lora_params(model) -> list:
    """Every LoRA weight of `model`, made trainable (again: `load_adapter` attaches frozen ones)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params
