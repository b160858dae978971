"""I-DLM conversion objective (reference §2): `[x_t | x_0]` with every response token of x_t set to
MASK, identical position ids in both halves, block-causal mask over absolute positions (prompt
included), CE at masked x_t positions plus the auto-balanced clean AR loss
`task + (task.detach() / clean.detach()) * clean`. Block size B = N - 1 for stride N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_diff_mask(L: int, B: int) -> torch.Tensor:
    """[2L, 2L] bool, True = attend. Rows/cols 0..L-1 are x_t, L..2L-1 are x_0 (same positions).
    x_t->x_t: same block and q >= kv; x_t->x_0: block(q) > block(kv); x_0->x_0: q >= kv."""
    i = torch.arange(L)
    q, k = i[:, None], i[None, :]
    bq, bk = q // B, k // B
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    m[:L, :L] = (bq == bk) & (q >= k)
    m[:L, L:] = bq > bk
    m[L:, L:] = q >= k
    return m


def build_example(seq: list[int], prompt_len: int, B: int, mask_id: int):
    L = len(seq)
    x0 = torch.tensor(seq)
    xt = x0.clone()
    xt[prompt_len:] = mask_id
    ids = torch.cat([xt, x0])
    pos = torch.arange(L).repeat(2)
    mask = block_diff_mask(L, B)
    # noisy labels: row i (a masked response row) predicts x_{i+1}; clean: row i predicts x_{i+1} for
    # every response token x_{i+1} (the first response token included)
    noisy = torch.full((L,), -100, dtype=torch.long)
    clean = torch.full((L,), -100, dtype=torch.long)
    for r in range(L - 1):
        if r + 1 >= prompt_len:
            clean[r] = seq[r + 1]
            if r >= prompt_len:
                noisy[r] = seq[r + 1]
    return ids, pos, mask, torch.cat([noisy, clean])


def collate(examples, stride: int, mask_id: int):
    B = max(stride - 1, 1)
    built = [build_example(s, p, B, mask_id) for s, p in examples]
    T = max(b[0].shape[0] for b in built)
    n = len(built)
    ids = torch.full((n, T), mask_id, dtype=torch.long)
    pos = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, T, dtype=torch.bool)
    labels = torch.full((n, T), -100, dtype=torch.long)
    half = torch.zeros(n, T, dtype=torch.long)  # 1 = noisy half, 2 = clean half, 0 = pad
    for b, (i, p, m, la) in enumerate(built):
        t = i.shape[0]
        ids[b, :t], pos[b, :t], mask[b, :t, :t], labels[b, :t] = i, p, m, la
        half[b, : t // 2], half[b, t // 2 : t] = 1, 2
        mask[b, torch.arange(t, T), torch.arange(t, T)] = True
    return ids, pos, mask, labels, half


def loss_fn(model, batch) -> tuple[torch.Tensor, dict]:
    ids, pos, mask, labels, half = batch
    h = model(ids, pos, dense_mask=mask)
    sel_t = (labels != -100) & (half == 1)
    sel_c = (labels != -100) & (half == 2)
    task = F.cross_entropy(model.compute_logits(h[sel_t]).float(), labels[sel_t])
    clean = F.cross_entropy(model.compute_logits(h[sel_c]).float(), labels[sel_c])
    loss = task + (task.detach() / clean.detach()) * clean
    return loss, {"task": task.item(), "clean": clean.item()}


def prepare_model(model):
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params
