"""Triton kernels for ISD verification and sampling; `kernels/acceptance_ref.py` defines the
semantics and the tests compare the two (on CPU under `TRITON_INTERPRET=1`, on CUDA when lent).

Owns: the launchers `verify_triton` / `sample_triton` (shape and dtype asserts before every
launch) and three kernels, one program per request (verify) or per row (sample):
- `_verify_greedy`: argmax of each target row (online over vocab blocks), first mismatch against
  the drafts, the correction token, or the bonus token when every draft matched;
- `_verify_stochastic`: the ratio test `u * q(d) < p(d)` per draft, first rejection, then the
  residual max(0, p - q) (or the bonus row p) sampled by an exponential race over vocab blocks
  with the counter-based hash of `kernels.rng` computed in-kernel, so the residual is never
  materialised and results equal the reference's;
- `_race_sample`: one token per row from processed probabilities (bonus / draft sampling).
Top-k / top-p truncation and the softmax run in torch (`processed_probs`) before the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import rng
from kernels.acceptance_ref import PLACEHOLDER, SamplingMetadata, processed_probs

BLOCK_V = 1024


@triton.jit
def _fmix32(h):
    # h: int64 holding a uint32 value; products wrap, the low 32 bits are kept (as in kernels.rng).
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _row_hash(key, step, word):
    h = _fmix32(key ^ ((step * 0x9E3779B1) & 0xFFFFFFFF))
    return _fmix32(h ^ ((word * 0x85EBCA77) & 0xFFFFFFFF))


@triton.jit
def _uniform(h):
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _row_argmax(ptr, V, BLOCK: tl.constexpr):
    best_val = -float("inf")
    best_idx = 0
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        x = tl.load(ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        i = tl.argmax(x, axis=0) + v0
        upd = m > best_val  # strictly greater: the first index wins ties, as torch.argmax
        best_idx = tl.where(upd, i, best_idx)
        best_val = tl.where(upd, m, best_val)
    return best_idx


@triton.jit
def _verify_greedy(
    L, D, T_START, D_START, NK, OUT, NUM_OUT,
    V, stride_l, stride_out,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    ts = tl.load(T_START + b)
    ds = tl.load(D_START + b)
    k = tl.load(NK + b)
    n_acc = k
    found = 0
    corr = 0
    bonus = 0
    for j in range(0, k + 1):
        a = _row_argmax(L + (ts + j).to(tl.int64) * stride_l, V, BLOCK)
        d = tl.load(D + ds + j, mask=j < k, other=-1)
        miss = (j < k) & (d != a) & (found == 0)
        n_acc = tl.where(miss, j, n_acc)
        corr = tl.where(miss, a, corr)
        found = tl.where(miss, 1, found)
        bonus = tl.where(j == k, a, bonus)
        tl.store(OUT + b * stride_out + j, d, mask=(j < k) & (found == 0))
    tl.store(OUT + b * stride_out + n_acc, tl.where(found == 1, corr, bonus))
    tl.store(NUM_OUT + b, n_acc + 1)


@triton.jit
def _verify_stochastic(
    P, Q, D, T_START, D_START, NK, KEY, STEP, OUT, NUM_OUT,
    V, stride_p, stride_q, stride_out,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    ts = tl.load(T_START + b)
    ds = tl.load(D_START + b)
    k = tl.load(NK + b)
    key = tl.load(KEY + b)
    step = tl.load(STEP + b)
    n_acc = k
    found = 0
    for j in range(0, k):
        d = tl.load(D + ds + j)
        pd = tl.load(P + (ts + j).to(tl.int64) * stride_p + d)
        qd = tl.load(Q + (ds + j).to(tl.int64) * stride_q + d)
        u = _uniform(_fmix32(_row_hash(key, step, j * 4 + 0)))
        rej = (found == 0) & ~(u * qd < pd)
        n_acc = tl.where(rej, j, n_acc)
        found = tl.where(rej, 1, found)
        tl.store(OUT + b * stride_out + j, d, mask=found == 0)
    # Exponential race over the residual (rejection) or the bonus row p (all accepted).
    base = _row_hash(key, step, n_acc * 4 + 1)
    is_bonus = n_acc == k
    # q is read only on a rejection (a request without drafts may point past the last q row).
    q_lim = tl.where(is_bonus, 0, V)
    p_row = P + (ts + n_acc).to(tl.int64) * stride_p
    q_row = Q + (ds + tl.where(is_bonus, 0, n_acc)).to(tl.int64) * stride_q
    best_r, best_r_idx = -1.0, 0
    best_p, best_p_idx = -1.0, 0
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        m = offs < V
        p = tl.load(p_row + offs, mask=m, other=0.0)
        q = tl.load(q_row + offs, mask=offs < q_lim, other=0.0)
        w = tl.where(is_bonus, p, tl.maximum(p - q, 0.0))
        u = _uniform(_fmix32(base ^ ((offs.to(tl.int64) * 0xC2B2AE3D) & 0xFFFFFFFF)))
        e = -tl.log(u)
        r = tl.where(m, w / e, -1.0)
        rp = tl.where(m, p / e, -1.0)
        mr = tl.max(r, axis=0)
        ir = tl.argmax(r, axis=0) + v0
        upd = mr > best_r
        best_r_idx = tl.where(upd, ir, best_r_idx)
        best_r = tl.where(upd, mr, best_r)
        mp = tl.max(rp, axis=0)
        ip = tl.argmax(rp, axis=0) + v0
        updp = mp > best_p
        best_p_idx = tl.where(updp, ip, best_p_idx)
        best_p = tl.where(updp, mp, best_p)
    # p == q numerically leaves no residual mass: fall back to p (the reference does the same).
    tok = tl.where(best_r > 0, best_r_idx, best_p_idx)
    tl.store(OUT + b * stride_out + n_acc, tok)
    tl.store(NUM_OUT + b, n_acc + 1)


@triton.jit
def _race_sample(P, BASE, OUT, V, stride_p, BLOCK: tl.constexpr):
    r_i = tl.program_id(0)
    base = tl.load(BASE + r_i)
    row = P + r_i.to(tl.int64) * stride_p
    best, best_idx = -1.0, 0
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        m = offs < V
        p = tl.load(row + offs, mask=m, other=0.0)
        u = _uniform(_fmix32(base ^ ((offs.to(tl.int64) * 0xC2B2AE3D) & 0xFFFFFFFF)))
        r = tl.where(m, p / (-tl.log(u)), -1.0)
        mr = tl.max(r, axis=0)
        ir = tl.argmax(r, axis=0) + v0
        upd = mr > best
        best_idx = tl.where(upd, ir, best_idx)
        best = tl.where(upd, mr, best)
    tl.store(OUT + r_i, best_idx)


def _block(V: int) -> int:
    return min(BLOCK_V, triton.next_power_of_2(V))


def verify_triton(
    target_logits: torch.Tensor,  # [sum(k_i + 1), V]
    draft_logits: torch.Tensor | None,  # [sum(k_i), V]
    draft_token_ids: torch.Tensor,  # [sum(k_i)]
    num_drafts: list[int],
    meta: SamplingMetadata,
) -> tuple[torch.Tensor, torch.Tensor]:
    B = len(num_drafts)
    R, V = target_logits.shape
    assert R == sum(num_drafts) + B, f"target_logits has {R} rows, expected sum(k)+B={sum(num_drafts) + B}"
    assert draft_token_ids.numel() == sum(num_drafts)
    assert meta.temperature.shape[0] == B
    dev = target_logits.device
    K = max(num_drafts) if num_drafts else 0
    out = torch.full((B, K + 1), PLACEHOLDER, dtype=torch.long, device=dev)
    num_out = torch.zeros(B, dtype=torch.long, device=dev)
    if B == 0:
        return out, num_out
    nk = torch.tensor(num_drafts, dtype=torch.long, device=dev)
    d_start = torch.cumsum(nk, 0) - nk
    t_start = d_start + torch.arange(B, device=dev)
    drafts = draft_token_ids.to(torch.long).contiguous()
    greedy = (meta.temperature <= 0).to(dev)
    for sel, is_greedy in ((greedy.nonzero().squeeze(1), True), ((~greedy).nonzero().squeeze(1), False)):
        n = sel.numel()
        if n == 0:
            continue
        sub_out = torch.full((n, K + 1), PLACEHOLDER, dtype=torch.long, device=dev)
        sub_num = torch.zeros(n, dtype=torch.long, device=dev)
        if is_greedy:
            logits = target_logits.contiguous()
            _verify_greedy[(n,)](
                logits, drafts, t_start[sel].contiguous(), d_start[sel].contiguous(), nk[sel].contiguous(),
                sub_out, sub_num, V, logits.stride(0), sub_out.stride(0), BLOCK=_block(V),
            )
        else:
            assert draft_logits is not None or sum(num_drafts) == 0, "draft_logits needed for sampled requests"
            req_t = torch.repeat_interleave(torch.arange(B, device=dev), nk + 1)
            m_t = meta.rows(req_t)
            p = processed_probs(target_logits, m_t.temperature, m_t.top_k, m_t.top_p).contiguous()
            if sum(num_drafts):
                req_d = torch.repeat_interleave(torch.arange(B, device=dev), nk)
                m_d = meta.rows(req_d)
                q = processed_probs(draft_logits, m_d.temperature, m_d.top_k, m_d.top_p).contiguous()
            else:
                q = torch.zeros(1, V, device=dev)
            _verify_stochastic[(n,)](
                p, q, drafts if drafts.numel() else torch.zeros(1, dtype=torch.long, device=dev),
                t_start[sel].contiguous(), d_start[sel].contiguous(), nk[sel].contiguous(),
                meta.key[sel].to(torch.long).contiguous(), meta.step[sel].to(torch.long).contiguous(),
                sub_out, sub_num, V, p.stride(0), q.stride(0), sub_out.stride(0), BLOCK=_block(V),
            )
        out[sel] = sub_out
        num_out[sel] = sub_num
    return out, num_out


def sample_triton(
    logits: torch.Tensor,  # [R, V]
    req_index: torch.Tensor,  # [R]
    stream: torch.Tensor,  # [R]
    meta: SamplingMetadata,
    purpose: int,
) -> torch.Tensor:  # [R] int64
    R, V = logits.shape
    assert req_index.shape == (R,) and stream.shape == (R,)
    m = meta.rows(req_index)
    tokens = logits.argmax(-1)
    sampled = (m.temperature > 0).nonzero().squeeze(1)
    if sampled.numel():
        ms = m.rows(sampled)
        p = processed_probs(logits[sampled], ms.temperature, ms.top_k, ms.top_p).contiguous()
        base = rng.row_hash(ms.key, ms.step, stream[sampled] * 4 + purpose).contiguous()
        out = torch.empty(sampled.numel(), dtype=torch.long, device=logits.device)
        _race_sample[(sampled.numel(),)](p, base, out, V, p.stride(0), BLOCK=_block(V))
        tokens[sampled] = out
    return tokens
