"""Plain-torch reference for ISD verification and sampling: this file *defines* the semantics.

Owns: `SamplingMetadata`, `processed_probs` (temperature -> top-k -> top-p, the request's AR sampling
distribution), `sample_ref` (draw one token per row) and `verify_ref` (the speculative-sampling
acceptance of a batch of draft blocks). The Triton kernels in `idlm_kernels/acceptance.py` must match it.

Vocabulary (as in vLLM's rejection sampler): for request i with k_i drafts, `target_logits` holds
k_i + 1 rows: row j < k_i is the target distribution p_j for draft d_j, row k_i is the bonus row.
Drafts come with `draft_logits` (one row each) from which q_j is computed with the *same* request
parameters. Output row i: accepted drafts, then one recovered token (first rejection, drawn from
normalize(max(0, p - q))) or the bonus token (all accepted, drawn from p_k); padded with PLACEHOLDER.

Rules (exact for any proposal q, see DESIGN §1):
- greedy request (temperature 0): accept d_j iff d_j == argmax p_j (first index on ties); the
  recovered / bonus token is the argmax.
- otherwise accept d_j iff u_j * q_j(d_j) < p_j(d_j), u_j ~ U(0,1) (= min(1, p/q) test without a
  division; q(d)=0 accepts iff p(d)>0); on rejection sample the residual by the exponential race
  argmax_x r(x) / E_x, E_x = -log U_x, which draws x with probability r(x) / sum(r) without
  normalising or materialising a sampled CDF.
- a draft proposed deterministically (argmax drafting, test drafters) is passed as one-hot logits
  (0 at the draft, -inf elsewhere), which makes q one-hot: accept with probability p(d).
Random numbers come from `idlm_kernels.rng` keyed per request, so results are reproducible per seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm_kernels import rng

PLACEHOLDER = -1
# race_sample draws one uniform per (row, vocab entry); rows are processed in chunks of at most this
# many entries so the int64 hash temporaries stay bounded (256 rows x 151,936 would be ~300 MB each).
RACE_CHUNK_ELEMS = 1 << 22


@dataclass
class SamplingMetadata:
    """Per-request sampling parameters of one batch, as tensors (B = requests)."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, -1 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    key: torch.Tensor  # [B] int64 in [0, 2^32): request RNG key (rng.request_key(seed))
    step: torch.Tensor  # [B] int64: request-local round counter (a fresh random stream per round)

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0).all())

    def rows(self, req_index: torch.Tensor) -> SamplingMetadata:
        return SamplingMetadata(*(t[req_index] for t in (self.temperature, self.top_k, self.top_p, self.key, self.step)))


def _truncated_softmax(
    logits: torch.Tensor,  # [R, V]
    temperature: torch.Tensor,  # [R]
    top_k: torch.Tensor,  # [R]
    top_p: torch.Tensor,  # [R]
) -> tuple[torch.Tensor, torch.Tensor]:  # scaled logits x [R, V] float32, probs [R, V] float32
    """Temperature -> top-k -> top-p -> renormalise, for sampled rows (greedy rows use T = 1 here).
    Every step is row-local and rows without top-k / top-p are left untouched, so a row's result
    never depends on which other rows share the batch."""
    R, V = logits.shape
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x = logits.float() / t[:, None]
    k = torch.where((top_k <= 0) | (top_k >= V), torch.full_like(top_k, V), top_k)
    rk = (k < V).nonzero().squeeze(1)  # rows with an active top-k; others skip the (costly) topk
    if rk.numel():
        xk, kk = x[rk], k[rk]
        kth = torch.topk(xk, int(kk.max()), dim=-1).values.gather(1, (kk - 1)[:, None])  # [Rk, 1]
        x[rk] = torch.where(xk >= kth, xk, torch.full_like(xk, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    rp = (top_p < 1).nonzero().squeeze(1)
    if rp.numel():
        # NOTE: only rows that asked for top-p go through here. Applying it with top_p = 1 is not a
        # no-op in floats: the exclusive cumsum can round up to 1.0 before the tail, which would
        # drop tail tokens (and renormalise) depending on the other requests in the batch.
        pr = probs[rp]
        sp, _ = pr.sort(dim=-1, descending=True)
        before = sp.cumsum(-1) - sp  # exclusive cumulative mass of more probable tokens
        keep_sorted = before < top_p[rp][:, None].float()
        # threshold = probability of the last kept token in sorted order; keep everything >= it.
        n_keep = keep_sorted.sum(-1).clamp(min=1)
        thr = sp.gather(1, (n_keep - 1)[:, None])
        kept = pr >= thr
        pr = torch.where(kept, pr, torch.zeros_like(pr))
        probs[rp] = pr / pr.sum(-1, keepdim=True)
        x[rp] = torch.where(kept, x[rp], torch.full_like(pr, float("-inf")))
    return x, probs


def processed_probs(
    logits: torch.Tensor,  # [R, V]
    temperature: torch.Tensor,  # [R]
    top_k: torch.Tensor,  # [R]
    top_p: torch.Tensor,  # [R]
) -> torch.Tensor:  # [R, V] float32
    """The AR sampling distribution: softmax(logits / T) truncated by top-k then top-p, renormalised.
    Greedy rows (T = 0) become one-hot at the argmax. Ties at a truncation boundary are all kept, so
    the kept set is a function of the values alone (implementation-independent)."""
    _, probs = _truncated_softmax(logits, temperature, top_k, top_p)
    greedy = temperature <= 0
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def truncation_threshold(
    logits: torch.Tensor,  # [R, V]
    temperature: torch.Tensor,  # [R], > 0 (sampled rows only)
    top_k: torch.Tensor,  # [R]
    top_p: torch.Tensor,  # [R]
) -> torch.Tensor:  # [R] float32
    """Per-row threshold on the scaled logits x = logits / T such that the kept set of
    `processed_probs` is exactly {v : x_v >= thr} (-inf when nothing is truncated).

    Why one number suffices: top-k keeps x >= kth and top-p keeps probs >= a probability, and
    softmax is monotone in x, so the kept set is an upper set of x; its smallest member is the
    threshold. The Triton kernels use it to apply truncation inside their online softmax."""
    R, V = logits.shape
    thr = torch.full((R,), float("-inf"), dtype=torch.float32, device=logits.device)
    k_on = (top_k > 0) & (top_k < V)
    rows = (k_on | (top_p < 1)).nonzero().squeeze(1)
    if rows.numel():
        x, _ = _truncated_softmax(logits[rows], temperature[rows], top_k[rows], top_p[rows])
        thr[rows] = torch.where(x > float("-inf"), x, torch.full_like(x, float("inf"))).amin(-1)
    return thr


def race_sample(weights: torch.Tensor, base_hash: torch.Tensor) -> torch.Tensor:
    """[R, V] non-negative weights -> [R] index drawn with probability w / sum(w) (exponential race:
    argmax_x w(x) / E_x with E_x = -log U_x ~ Exp(1); first index on ties)."""
    R, V = weights.shape
    out = torch.empty(R, dtype=torch.long, device=weights.device)
    step = max(1, RACE_CHUNK_ELEMS // max(V, 1))
    for r0 in range(0, R, step):
        u = rng.row_uniforms(base_hash[r0 : r0 + step], V)  # [r, V]
        out[r0 : r0 + step] = (weights[r0 : r0 + step] / -torch.log(u)).argmax(-1)
    return out


def sample_ref(
    logits: torch.Tensor,  # [R, V]
    req_index: torch.Tensor,  # [R] request of each row
    stream: torch.Tensor,  # [R] stream index of each row within its request's round
    meta: SamplingMetadata,
    purpose: int = rng.PURPOSE_DRAFT,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [R] int64, processed probs [R, V]
    m = meta.rows(req_index)
    probs = processed_probs(logits, m.temperature, m.top_k, m.top_p)
    tokens = logits.argmax(-1)
    sampled = (m.temperature > 0).nonzero().squeeze(1)  # only these rows draw random numbers
    if sampled.numel():
        base = rng.row_hash(m.key[sampled], m.step[sampled], stream[sampled] * 4 + purpose)
        tokens[sampled] = race_sample(probs[sampled], base)
    return tokens, probs


def _first_true(mask: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] index of the first True per row, `default` where there is none."""
    if mask.shape[1] == 0:
        return default.clone()
    return torch.where(mask.any(1), mask.long().argmax(1), default)


def verify_ref(
    target_logits: torch.Tensor,  # [sum(k_i + 1), V]
    draft_logits: torch.Tensor | None,  # [sum(k_i), V] (None when every request is greedy)
    draft_token_ids: torch.Tensor,  # [sum(k_i)] int64
    num_drafts: list[int],  # k_i per request
    meta: SamplingMetadata,
) -> tuple[torch.Tensor, torch.Tensor]:  # output [B, max_k + 1] int64 (PLACEHOLDER padded), num_out [B]
    """All requests at once on a padded [B, K] grid of draft slots (no per-request Python loop).
    Bit-identical to the per-request loop kept in tests/kernels/test_acceptance.py, because every
    op it uses is row-local (processed_probs, gathers, the counter-based RNG)."""
    B = len(num_drafts)
    K = max(num_drafts) if num_drafts else 0
    dev = target_logits.device
    out = torch.full((B, K + 1), PLACEHOLDER, dtype=torch.long, device=dev)
    if B == 0:
        return out, torch.zeros(0, dtype=torch.long, device=dev)
    nk = torch.tensor(num_drafts, dtype=torch.long, device=dev)  # [B]
    d_start = torch.cumsum(nk, 0) - nk  # [B] first draft row of each request
    t_start = d_start + torch.arange(B, device=dev)  # [B] first target row
    j = torch.arange(K, device=dev)  # [K]
    valid = j[None, :] < nk[:, None]  # [B, K] real draft slots
    n_d = int(draft_token_ids.numel())
    d_row = (d_start[:, None] + j[None, :]).clamp(max=max(n_d - 1, 0))  # [B, K] flat draft row
    t_row = t_start[:, None] + j[None, :]  # [B, K] target row verifying each slot (valid slots)
    t_row = torch.where(valid, t_row, t_start[:, None])
    drafts = torch.where(valid, draft_token_ids[d_row], 0) if n_d else torch.zeros(B, K, dtype=torch.long, device=dev)
    greedy = meta.temperature <= 0  # [B]
    n_acc = nk.clone()  # [B]
    tok = torch.zeros(B, dtype=torch.long, device=dev)  # [B] recovered / bonus token

    gi = greedy.nonzero().squeeze(1)
    if gi.numel():
        # argmax only of the rows of greedy requests; a recovered token and a bonus token are both
        # the argmax of row t_start + n_acc.
        g_rows = torch.repeat_interleave(t_start[gi], nk[gi] + 1) + _ragged_arange(nk[gi] + 1)
        am = torch.zeros(target_logits.shape[0], dtype=torch.long, device=dev)  # [sum(k+1)]
        am[g_rows] = target_logits[g_rows].argmax(-1)
        miss = valid[gi] & (drafts[gi] != am[t_row[gi]])  # [Bg, K]
        n_acc[gi] = _first_true(miss, nk[gi])
        tok[gi] = am[t_start[gi] + n_acc[gi]]

    si = (~greedy).nonzero().squeeze(1)
    if si.numel():
        tok[si], n_acc[si] = _verify_sampled(target_logits, draft_logits, drafts[si], valid[si], nk[si],
                                             t_start[si], d_start[si], meta.rows(si))

    acc = j[None, :] < n_acc[:, None]  # [B, K]
    out[:, :K] = torch.where(acc, drafts, out[:, :K])
    out.scatter_(1, n_acc[:, None], tok[:, None])
    return out, n_acc + 1


def _verify_sampled(target_logits, draft_logits, drafts, valid, nk, t_start, d_start, m):
    """Sampled requests (Bs of them): ratio test per slot, first rejection, residual / bonus race.
    Returns (tokens [Bs], n_acc [Bs])."""
    dev = target_logits.device
    Bs, K = drafts.shape
    # target rows of these requests, each with its request's parameters: [sum(k+1), V]
    t_rows = torch.repeat_interleave(t_start, nk + 1) + _ragged_arange(nk + 1)
    req_t = torch.repeat_interleave(torch.arange(Bs, device=dev), nk + 1)
    p = processed_probs(target_logits[t_rows], m.temperature[req_t], m.top_k[req_t], m.top_p[req_t])
    p_off = torch.cumsum(nk + 1, 0) - (nk + 1)  # [Bs] first row of each request in p
    n_acc = nk.clone()
    j = torch.arange(K, device=dev)
    if K and int(nk.sum()):
        d_rows = torch.repeat_interleave(d_start, nk) + _ragged_arange(nk)
        req_d = torch.repeat_interleave(torch.arange(Bs, device=dev), nk)
        q = processed_probs(draft_logits[d_rows], m.temperature[req_d], m.top_k[req_d], m.top_p[req_d])
        q_off = torch.cumsum(nk, 0) - nk
        pi = (p_off[:, None] + j).clamp(max=p.shape[0] - 1)  # [Bs, K]
        qi = (q_off[:, None] + j).clamp(max=q.shape[0] - 1)
        pd = p[pi, drafts]  # [Bs, K] p_j(d_j)
        qd = q[qi, drafts]  # [Bs, K] q_j(d_j)
        word = (j * 4 + rng.PURPOSE_ACCEPT)[None, :].expand(Bs, K)
        u = rng.scalar_uniforms(rng.row_hash(m.key[:, None].expand(Bs, K), m.step[:, None].expand(Bs, K), word))
        rejected = valid & ~(u * qd < pd)  # = min(1, p/q) test without a division
        n_acc = _first_true(rejected, nk)
    weights = p[p_off + n_acc]  # [Bs, V] bonus rows p_k; residual rows overwritten below
    res = (n_acc < nk).nonzero().squeeze(1)
    if res.numel():
        resid = (p[p_off[res] + n_acc[res]] - q[q_off[res] + n_acc[res]]).clamp(min=0)
        # p == q numerically leaves no residual mass (rejection impossible in exact arithmetic): use p.
        weights[res] = torch.where((resid > 0).any(-1, keepdim=True), resid, weights[res])
    base = rng.row_hash(m.key, m.step, n_acc * 4 + rng.PURPOSE_SAMPLE)
    return race_sample(weights, base), n_acc


def _ragged_arange(n: torch.Tensor) -> torch.Tensor:
    """[B] lengths -> concatenated aranges [sum(n)] (0..n_0-1, 0..n_1-1, ...)."""
    starts = torch.cumsum(n, 0) - n
    return torch.arange(int(n.sum()), device=n.device) - torch.repeat_interleave(starts, n)
