"""Triton kernels for ISD verification and sampling; `idlm_kernels/acceptance_ref.py` defines the
semantics and tests compare the two (on CPU under `TRITON_INTERPRET=1`, on CUDA when one is lent).

Owns: the launchers `verify_triton` / `sample_triton` (they assert shapes, dtypes and contiguity
before every launch) and four kernels:
- `_verify_greedy`: argmax of each target row (online over vocab blocks), first mismatch against
  the drafts, then the correction token, or the bonus token when every draft matched. A request
  stops reading rows after its first mismatch.
- `_row_stats`: max and sum(exp(x - max)) of the scaled, truncated logits x = logits / T of every
  target and draft row of the sampled requests (one launch for both tensors). These two numbers
  give p(v) = exp(x_v - max) / sum anywhere without storing the softmax.
- `_verify_sampled`: the ratio test `u * q(d) < p(d)` per draft, first rejection, then the residual
  max(0, p - q) (or the bonus row p when all drafts were accepted) sampled by an exponential race
  argmax_v w(v) / E_v over vocab blocks. The residual is never materialised, and the uniforms come
  from the same counter-based hash as `idlm_kernels.rng`, computed in-kernel with uint32 arithmetic.
- `_race_rows`: one token per row from the processed distribution (draft / bonus sampling).
Top-k / top-p truncation is a torch op before the launch (`truncation_threshold`: one threshold per
row on the scaled logits); the kernels apply it while reading the logits.

Equality with the reference. Random numbers and the scaled logits (IEEE division, `div_rn`) are
bit-identical. Normalisers are summed in another order and exp/log come from another math library,
so p and q can differ from torch's in the last bits: an accept decision or a race winner can then
differ when two compared numbers are within a few ulps. The tests measure that (none on CPU for
their cases) and characterise any difference.

Layout (vLLM's vocabulary): request b has k_b drafts, target rows t_start[b] .. t_start[b] + k_b
(the last is the bonus row) and draft rows d_start[b] .. d_start[b] + k_b - 1. Output [B, K + 1]
is padded with PLACEHOLDER.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from idlm_kernels.acceptance_ref import PLACEHOLDER, SamplingMetadata, truncation_threshold
from idlm_kernels.triton_rng import fmix32, row_hash, uniform, vocab_exp1

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _argmax_update(best, best_idx, score, v0):
    # Running (max, first argmax) over vocab blocks; strict > keeps the earlier block on ties, and
    # tl.argmax keeps the first index inside a block, so ties resolve like torch.argmax.
    m = tl.max(score, axis=1)
    i = tl.argmax(score, axis=1) + v0
    upd = m > best
    return tl.where(upd, m, best), tl.where(upd, i, best_idx)


@triton.jit(do_not_specialize=["Bg"])  # batch sizes vary every step: no recompiles
def _verify_greedy(
    TL,  # [Rt, V] target logits
    D,  # [Rd] int64 draft token ids
    REQ,  # [Bg] int64 requests handled by this launch (the greedy ones)
    T_START, D_START, NK,  # [B] int64 first target row, first draft row, number of drafts
    OUT,  # [B, K + 1] int64, pre-filled with PLACEHOLDER
    NUM_OUT,  # [B] int64
    Bg, V, stride_t, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = i < Bg
    b = tl.load(REQ + i, mask=live, other=0)
    ts = tl.load(T_START + b, mask=live, other=0)
    ds = tl.load(D_START + b, mask=live, other=0)
    k = tl.load(NK + b, mask=live, other=0)
    j = 0
    # Walk target rows left to right; a lane stops at its first mismatch (or its bonus row), so
    # rows after a rejection are never read.
    while tl.sum(live.to(tl.int32), axis=0) > 0:
        row = TL + (ts + j).to(tl.int64)[:, None] * stride_t  # [BLOCK_R, 1] pointers
        best = tl.full([BLOCK_R], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_R], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(row + offs[None, :], mask=live[:, None] & (offs < V)[None, :], other=float("-inf"))
            best, best_idx = _argmax_update(best, best_idx, x.to(tl.float32), v0)
        is_draft = j < k
        d = tl.load(D + ds + j, mask=live & is_draft, other=-1)
        stop = live & (~is_draft | (d != best_idx))
        tl.store(OUT + b * stride_out + j, tl.where(stop, best_idx.to(tl.int64), d), mask=live)
        tl.store(NUM_OUT + b, tl.zeros([BLOCK_R], tl.int64) + j + 1, mask=stop)
        live = live & ~stop
        j += 1


@triton.jit(do_not_specialize=["NA", "N"])
def _row_stats(
    A,  # [NA, V] logits (target rows)
    B,  # [N - NA, V] logits (draft rows)
    TEMP,  # [N] float32 temperature per entry; <= 0 skips the entry (greedy rows)
    THR,  # [N] float32 truncation threshold on x = logits / T (-inf: none)
    M_OUT,  # [N] float32 max of the kept x
    S_OUT,  # [N] float32 sum over kept v of exp(x_v - max)
    NA, N, V, stride_a, stride_b,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    e = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = tl.load(TEMP + e, mask=e < N, other=0.0)
    live = (e < N) & (t > 0)
    t = tl.where(live, t, 1.0)
    thr = tl.load(THR + e, mask=live, other=0.0)
    in_a = live & (e < NA)
    in_b = live & (e >= NA)
    ra = A + e.to(tl.int64)[:, None] * stride_a
    rb = B + (e - NA).to(tl.int64)[:, None] * stride_b
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        vm = (offs < V)[None, :]
        # Two masked loads (only one is live per row) so A and B may have different dtypes.
        xa = tl.load(ra + offs[None, :], mask=in_a[:, None] & vm, other=float("-inf")).to(tl.float32)
        xb = tl.load(rb + offs[None, :], mask=in_b[:, None] & vm, other=float("-inf")).to(tl.float32)
        # IEEE division, as torch's logits / T: the threshold comparison is then exact.
        x = tl.math.div_rn(tl.where(in_b[:, None], xb, xa), t[:, None])
        x = tl.where(x >= thr[:, None], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while all are masked
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(M_OUT + e, m, mask=live)
    tl.store(S_OUT + e, s, mask=live)


@triton.jit
def _prob(x, thr, m, s):
    # Truncated softmax probability from a scaled logit and its row's (threshold, max, sum).
    return tl.where(x >= thr, tl.exp(x - m) / s, 0.0)


@triton.jit(do_not_specialize=["Bs", "Rt", "K"])
def _verify_sampled(
    TL,  # [Rt, V] target logits
    DL,  # [Rd, V] draft logits
    D,  # [Rd] int64 draft token ids
    REQ,  # [Bs] int64 requests handled by this launch (the sampled ones)
    T_START, D_START, NK,  # [B] int64
    TEMP,  # [B] float32 (> 0 here)
    KEY, STEP,  # [B] int64 RNG key (uint32 value) and round counter
    STATS,  # [4, Rt + Rd] float32: rows thr, max, sum, (unused); entry Rt + r is draft row r
    OUT,  # [B, K + 1] int64, pre-filled with PLACEHOLDER
    NUM_OUT,  # [B] int64
    Bs, Rt, V, K, stride_t, stride_d, stride_out, stride_st,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = i < Bs
    b = tl.load(REQ + i, mask=live, other=0)
    ts = tl.load(T_START + b, mask=live, other=0)
    ds = tl.load(D_START + b, mask=live, other=0)
    k = tl.load(NK + b, mask=live, other=0)
    t = tl.load(TEMP + b, mask=live, other=1.0)
    key = tl.load(KEY + b, mask=live, other=0).to(tl.uint32)
    step = tl.load(STEP + b, mask=live, other=0).to(tl.uint32)

    # 1. Ratio tests, left to right; a lane stops at its first rejection.
    n_acc = k
    found = ~live
    for j in range(0, K):
        act = (j < k) & ~found
        d = tl.load(D + ds + j, mask=act, other=0)
        tr = ts + j
        dr = Rt + ds + j
        xp = tl.math.div_rn(tl.load(TL + tr * stride_t + d, mask=act, other=0.0).to(tl.float32), t)
        xq = tl.math.div_rn(tl.load(DL + (ds + j) * stride_d + d, mask=act, other=0.0).to(tl.float32), t)
        pd = _prob(xp, tl.load(STATS + tr, mask=act, other=0.0),
                   tl.load(STATS + stride_st + tr, mask=act, other=0.0),
                   tl.load(STATS + 2 * stride_st + tr, mask=act, other=1.0))
        qd = _prob(xq, tl.load(STATS + dr, mask=act, other=0.0),
                   tl.load(STATS + stride_st + dr, mask=act, other=0.0),
                   tl.load(STATS + 2 * stride_st + dr, mask=act, other=1.0))
        word = tl.zeros([BLOCK_R], tl.uint32) + (j * 4 + 0)  # stream word: draft j, PURPOSE_ACCEPT
        u = uniform(fmix32(row_hash(key, step, word)))
        rej = act & ~(u * qd < pd)  # accept with probability min(1, p/q), no division
        tl.store(OUT + b * stride_out + j, d, mask=act & ~rej)
        n_acc = tl.where(rej, j, n_acc)
        found = found | rej

    # 2. One token per lane by an exponential race: over the residual max(0, p - q) of the rejected
    # position, or over the bonus row p when every draft was accepted. The race over p runs beside
    # it because a residual with no mass (p == q in floats) falls back to p, as in the reference.
    is_res = live & (n_acc < k)
    tr = ts + n_acc
    dr = Rt + ds + n_acc
    p_thr = tl.load(STATS + tr, mask=live, other=0.0)
    p_m = tl.load(STATS + stride_st + tr, mask=live, other=0.0)
    p_s = tl.load(STATS + 2 * stride_st + tr, mask=live, other=1.0)
    q_thr = tl.load(STATS + dr, mask=is_res, other=0.0)
    q_m = tl.load(STATS + stride_st + dr, mask=is_res, other=0.0)
    q_s = tl.load(STATS + 2 * stride_st + dr, mask=is_res, other=1.0)
    base = row_hash(key, step, (n_acc * 4 + 1).to(tl.uint32))  # PURPOSE_SAMPLE at position n_acc
    p_row = TL + tr.to(tl.int64)[:, None] * stride_t
    q_row = DL + (ds + n_acc).to(tl.int64)[:, None] * stride_d
    best_w = tl.full([BLOCK_R], -1.0, tl.float32)
    idx_w = tl.zeros([BLOCK_R], tl.int32)
    best_p = tl.full([BLOCK_R], -1.0, tl.float32)
    idx_p = tl.zeros([BLOCK_R], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        lm = live[:, None] & (offs < V)[None, :]
        x = tl.math.div_rn(tl.load(p_row + offs[None, :], mask=lm, other=float("-inf")).to(tl.float32), t[:, None])
        y = tl.load(q_row + offs[None, :], mask=lm & is_res[:, None], other=float("-inf")).to(tl.float32)
        y = tl.math.div_rn(y, t[:, None])
        p = tl.where(lm, _prob(x, p_thr[:, None], p_m[:, None], p_s[:, None]), 0.0)
        q = tl.where(lm & is_res[:, None], _prob(y, q_thr[:, None], q_m[:, None], q_s[:, None]), 0.0)
        w = tl.where(is_res[:, None], tl.maximum(p - q, 0.0), p)
        e = vocab_exp1(base, offs)
        best_w, idx_w = _argmax_update(best_w, idx_w, tl.where(lm, w / e, -1.0), v0)
        best_p, idx_p = _argmax_update(best_p, idx_p, tl.where(lm, p / e, -1.0), v0)
    tok = tl.where(best_w > 0, idx_w, idx_p)
    tl.store(OUT + b * stride_out + n_acc, tok.to(tl.int64), mask=live)
    tl.store(NUM_OUT + b, n_acc + 1, mask=live)


@triton.jit(do_not_specialize=["R"])
def _race_rows(
    L,  # [R, V] logits
    TEMP,  # [R] float32; rows with T <= 0 are skipped (greedy, argmax done by the launcher)
    STATS,  # [4, R] float32: thr, max, sum, (unused)
    KEY, STEP, WORD,  # [R] int64: request key, round counter, stream word (stream * 4 + purpose)
    OUT,  # [R] int64
    R, V, stride_l, stride_st,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = tl.load(TEMP + r, mask=r < R, other=0.0)
    live = (r < R) & (t > 0)
    t = tl.where(live, t, 1.0)
    thr = tl.load(STATS + r, mask=live, other=0.0)
    m = tl.load(STATS + stride_st + r, mask=live, other=0.0)
    s = tl.load(STATS + 2 * stride_st + r, mask=live, other=1.0)
    base = row_hash(tl.load(KEY + r, mask=live, other=0).to(tl.uint32),
                     tl.load(STEP + r, mask=live, other=0).to(tl.uint32),
                     tl.load(WORD + r, mask=live, other=0).to(tl.uint32))
    row = L + r.to(tl.int64)[:, None] * stride_l
    best = tl.full([BLOCK_R], -1.0, tl.float32)
    idx = tl.zeros([BLOCK_R], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        lm = live[:, None] & (offs < V)[None, :]
        x = tl.math.div_rn(tl.load(row + offs[None, :], mask=lm, other=float("-inf")).to(tl.float32), t[:, None])
        p = _prob(x, thr[:, None], m[:, None], s[:, None])
        best, idx = _argmax_update(best, idx, tl.where(lm, p / vocab_exp1(base, offs), -1.0), v0)
    tl.store(OUT + r, idx.to(tl.int64), mask=live)


def _config(device: torch.device, lanes: int, V: int) -> dict:
    """Launch shape. On a GPU one program per row / request with wide vocab blocks (the work is a
    stream over the vocab). Under the CPU interpreter every program costs Python overhead, so a
    program takes a block of up to 64 lanes and each op is one numpy call over [lanes, vocab]."""
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        block_v = min(4096, triton.next_power_of_2(V))
        return {"BLOCK_R": 1, "BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4}
    block_v = min(1024, triton.next_power_of_2(V))
    block_r = min(triton.next_power_of_2(max(lanes, 1)), 1024, max(16, 65536 // block_v))  # tile <= 64k elements
    return {"BLOCK_R": block_r, "BLOCK_V": block_v}


def _check_logits(name: str, x: torch.Tensor, rows: int | None, V: int | None = None) -> None:
    assert x.dim() == 2, f"{name}: expected [rows, vocab], got shape {tuple(x.shape)}"
    assert x.dtype in _LOGIT_DTYPES, f"{name}: dtype {x.dtype} not in {_LOGIT_DTYPES}"
    assert x.stride(1) == 1, f"{name}: vocab dimension must be contiguous (stride {x.stride()})"
    if rows is not None:
        assert x.shape[0] == rows, f"{name}: {x.shape[0]} rows, expected {rows}"
    if V is not None:
        assert x.shape[1] == V, f"{name}: vocab {x.shape[1]}, expected {V}"


def _check_meta(meta: SamplingMetadata, B: int, device: torch.device) -> None:
    for name in ("temperature", "top_k", "top_p", "key", "step"):
        t = getattr(meta, name)
        assert t.shape == (B,), f"meta.{name}: shape {tuple(t.shape)}, expected ({B},)"
        assert t.device == device, f"meta.{name} on {t.device}, logits on {device}"


def _stats(logits_a, logits_b, temp, top_k, top_p) -> torch.Tensor:
    """[4, N] float32 (thr, max, sum, unused) for N = rows(a) + rows(b); T <= 0 entries skipped."""
    na, V = logits_a.shape
    N = temp.shape[0]
    assert N == na + (0 if logits_b is None else logits_b.shape[0])
    stats = torch.zeros(4, N, dtype=torch.float32, device=temp.device)
    sampled = temp > 0
    k = torch.where(sampled, top_k, -1)  # greedy entries: no truncation work
    p = torch.where(sampled, top_p, 1.0)
    stats[0, :na] = truncation_threshold(logits_a, temp[:na], k[:na], p[:na])
    if logits_b is not None:
        stats[0, na:] = truncation_threshold(logits_b, temp[na:], k[na:], p[na:])
    b = logits_a if logits_b is None else logits_b
    cfg = _config(temp.device, N, V)
    _row_stats[(triton.cdiv(N, cfg["BLOCK_R"]),)](
        logits_a, b, temp.contiguous(), stats[0], stats[1], stats[2],
        na, N, V, logits_a.stride(0), b.stride(0), **cfg,
    )
    return stats


def verify_triton(
    target_logits: torch.Tensor,  # [sum(k_i + 1), V]
    draft_logits: torch.Tensor | None,  # [sum(k_i), V] (None when every request is greedy)
    draft_token_ids: torch.Tensor,  # [sum(k_i)] int64
    num_drafts: list[int],  # k_i per request
    meta: SamplingMetadata,
) -> tuple[torch.Tensor, torch.Tensor]:  # output [B, max_k + 1] int64 (PLACEHOLDER padded), num_out [B]
    B = len(num_drafts)
    n_d = sum(num_drafts)
    dev = target_logits.device
    _check_logits("target_logits", target_logits, n_d + B)
    V = target_logits.shape[1]
    assert draft_token_ids.shape == (n_d,) and draft_token_ids.dtype == torch.long, (
        f"draft_token_ids: expected int64 [{n_d}], got {draft_token_ids.dtype} {tuple(draft_token_ids.shape)}")
    assert draft_token_ids.is_contiguous() and draft_token_ids.device == dev
    _check_meta(meta, B, dev)
    K = max(num_drafts) if num_drafts else 0
    out = torch.full((B, K + 1), PLACEHOLDER, dtype=torch.long, device=dev)
    num_out = torch.zeros(B, dtype=torch.long, device=dev)
    if B == 0:
        return out, num_out
    nk = torch.tensor(num_drafts, dtype=torch.long, device=dev)  # [B]
    d_start = torch.cumsum(nk, 0) - nk  # [B]
    t_start = d_start + torch.arange(B, device=dev)  # [B]
    drafts = draft_token_ids if n_d else torch.zeros(1, dtype=torch.long, device=dev)
    greedy = meta.temperature <= 0
    gi = greedy.nonzero().squeeze(1)
    si = (~greedy).nonzero().squeeze(1)
    if gi.numel():
        cfg = _config(dev, gi.numel(), V)
        _verify_greedy[(triton.cdiv(gi.numel(), cfg["BLOCK_R"]),)](
            target_logits, drafts, gi, t_start, d_start, nk, out, num_out,
            gi.numel(), V, target_logits.stride(0), out.stride(0), **cfg,
        )
    if si.numel():
        if n_d:
            assert draft_logits is not None, "draft_logits are needed when sampled requests have drafts"
            _check_logits("draft_logits", draft_logits, n_d, V)
        dl = draft_logits if n_d else target_logits  # never read when there are no drafts
        # Per-row parameters; rows of greedy requests get T = 0 and are skipped by _row_stats.
        req_t = torch.repeat_interleave(torch.arange(B, device=dev), nk + 1)  # [Rt]
        req_d = torch.repeat_interleave(torch.arange(B, device=dev), nk)  # [Rd]
        req = torch.cat([req_t, req_d])
        temp = torch.where(greedy, 0.0, meta.temperature.float())[req]
        stats = _stats(target_logits, dl if n_d else None, temp, meta.top_k[req], meta.top_p[req])
        cfg = _config(dev, si.numel(), V)
        _verify_sampled[(triton.cdiv(si.numel(), cfg["BLOCK_R"]),)](
            target_logits, dl, drafts, si, t_start, d_start, nk,
            meta.temperature.float().contiguous(), meta.key.long().contiguous(), meta.step.long().contiguous(),
            stats, out, num_out,
            si.numel(), target_logits.shape[0], V, K, target_logits.stride(0), dl.stride(0), out.stride(0),
            stats.stride(0), **cfg,
        )
    return out, num_out


def sample_triton(
    logits: torch.Tensor,  # [R, V]
    req_index: torch.Tensor,  # [R] int64 request of each row
    stream: torch.Tensor,  # [R] int64 stream index of each row within its request's round
    meta: SamplingMetadata,
    purpose: int,
) -> torch.Tensor:  # [R] int64
    R = logits.shape[0]
    _check_logits("logits", logits, None)
    dev = logits.device
    assert req_index.shape == (R,) and stream.shape == (R,), "req_index / stream: one entry per row"
    _check_meta(meta, meta.temperature.shape[0], dev)
    m = meta.rows(req_index)
    tokens = torch.empty(R, dtype=torch.long, device=dev)
    greedy = m.temperature <= 0
    if bool(greedy.any()):
        tokens[greedy] = logits[greedy].argmax(-1)
    if not bool(greedy.all()):
        temp = torch.where(greedy, 0.0, m.temperature.float())
        stats = _stats(logits, None, temp, m.top_k, m.top_p)
        word = (stream.long() * 4 + purpose).contiguous()
        cfg = _config(dev, R, logits.shape[1])
        _race_rows[(triton.cdiv(R, cfg["BLOCK_R"]),)](
            logits, temp, stats, m.key.long().contiguous(), m.step.long().contiguous(), word, tokens,
            R, logits.shape[1], logits.stride(0), stats.stride(0), **cfg,
        )
    return tokens
