"""Plain-torch reference for ISD verification and sampling: this file *defines* the semantics.

Owns: `SamplingMetadata`, `processed_probs` (temperature -> top-k -> top-p, the request's AR sampling
distribution), `sample_ref` (draw one token per row) and `verify_ref` (the speculative-sampling
acceptance of a batch of draft blocks). The Triton kernels in `kernels/acceptance.py` must match it.

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
Random numbers come from `kernels.rng` keyed per request, so results are reproducible per seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import rng

PLACEHOLDER = -1


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


def processed_probs(
    logits: torch.Tensor,  # [R, V]
    temperature: torch.Tensor,  # [R]
    top_k: torch.Tensor,  # [R]
    top_p: torch.Tensor,  # [R]
) -> torch.Tensor:  # [R, V] float32
    """The AR sampling distribution: softmax(logits / T) truncated by top-k then top-p, renormalised.
    Greedy rows (T = 0) become one-hot at the argmax. Ties at a truncation boundary are all kept, so
    the kept set is a function of the values alone (implementation-independent)."""
    R, V = logits.shape
    x = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x = x / t[:, None]
    k = torch.where((top_k <= 0) | (top_k >= V), torch.full_like(top_k, V), top_k)
    if bool((k < V).any()):
        kth = torch.topk(x, int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])  # [R, 1]
        x = torch.where(x >= kth, x, torch.full_like(x, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    if bool((top_p < 1).any()):
        sp, _ = probs.sort(dim=-1, descending=True)
        before = sp.cumsum(-1) - sp  # exclusive cumulative mass of more probable tokens
        keep_sorted = before < top_p[:, None].float()
        # threshold = probability of the last kept token in sorted order; keep everything >= it.
        n_keep = keep_sorted.sum(-1).clamp(min=1)
        thr = sp.gather(1, (n_keep - 1)[:, None])
        probs = torch.where(probs >= thr, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def race_sample(weights: torch.Tensor, base_hash: torch.Tensor) -> torch.Tensor:
    """[R, V] non-negative weights -> [R] index drawn with probability w / sum(w) (exponential race)."""
    u = rng.row_uniforms(base_hash, weights.shape[1])
    e = -torch.log(u)
    return (weights / e).argmax(-1)


def sample_ref(
    logits: torch.Tensor,  # [R, V]
    req_index: torch.Tensor,  # [R] request of each row
    stream: torch.Tensor,  # [R] stream index of each row within its request's round
    meta: SamplingMetadata,
    purpose: int = rng.PURPOSE_DRAFT,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [R] int64, processed probs [R, V]
    m = meta.rows(req_index)
    probs = processed_probs(logits, m.temperature, m.top_k, m.top_p)
    greedy = m.temperature <= 0
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        base = rng.row_hash(m.key, m.step, stream * 4 + purpose)
        tokens = torch.where(greedy, tokens, race_sample(probs, base))
    return tokens, probs


def verify_ref(
    target_logits: torch.Tensor,  # [sum(k_i + 1), V]
    draft_logits: torch.Tensor | None,  # [sum(k_i), V] (None when every request is greedy)
    draft_token_ids: torch.Tensor,  # [sum(k_i)] int64
    num_drafts: list[int],  # k_i per request
    meta: SamplingMetadata,
) -> tuple[torch.Tensor, torch.Tensor]:  # output [B, max_k + 1] int64 (PLACEHOLDER padded), num_out [B]
    B = len(num_drafts)
    K = max(num_drafts) if num_drafts else 0
    device = target_logits.device
    out = torch.full((B, K + 1), PLACEHOLDER, dtype=torch.long, device=device)
    num_out = torch.zeros(B, dtype=torch.long, device=device)
    t_start, d_start = 0, 0
    for i, k in enumerate(num_drafts):
        tl = target_logits[t_start : t_start + k + 1]
        d = draft_token_ids[d_start : d_start + k]
        req = torch.full((k + 1,), i, dtype=torch.long, device=device)
        m = meta.rows(req)
        greedy = bool(m.temperature[0] <= 0)
        if greedy:
            am = tl.argmax(-1)  # [k+1]
            match = (d == am[:k]).long()
            n_acc = int(match.cumprod(0).sum()) if k else 0
            out[i, :n_acc] = d[:n_acc]
            out[i, n_acc] = am[n_acc]
        else:
            p = processed_probs(tl, m.temperature, m.top_k, m.top_p)  # [k+1, V]
            n_acc = k
            if k:
                q = processed_probs(draft_logits[d_start : d_start + k], m.temperature[:k], m.top_k[:k], m.top_p[:k])
                pd = p[:k].gather(1, d[:, None]).squeeze(1)
                qd = q.gather(1, d[:, None]).squeeze(1)
                pos = torch.arange(k, device=device)
                u = rng.scalar_uniforms(rng.row_hash(m.key[:k], m.step[:k], pos * 4 + rng.PURPOSE_ACCEPT))
                rejected = ~(u * qd < pd)
                if bool(rejected.any()):
                    n_acc = int(rejected.long().argmax())
            base = rng.row_hash(m.key[:1], m.step[:1], torch.tensor([n_acc * 4 + rng.PURPOSE_SAMPLE], device=device))
            if n_acc < k:
                resid = (p[n_acc] - q[n_acc]).clamp(min=0)
                if float(resid.sum()) <= 0:  # p == q numerically: rejection impossible in exact arithmetic
                    resid = p[n_acc]
                tok = race_sample(resid[None], base)[0]
            else:
                tok = race_sample(p[k][None], base)[0]
            out[i, :n_acc] = d[:n_acc]
            out[i, n_acc] = tok
        num_out[i] = n_acc + 1
        t_start += k + 1
        d_start += k
    return out, num_out
