"""Causal attention of a ragged flat batch against each request's paged KV cache: the SDPA gather
path (the CPU path, and the CUDA baseline under `IDLM_ATTENTION=torch`). The Triton kernel path is
`workers.kernel_attention`; both metadata classes expose `attend`, which the model's layers call.

Owns: `AttentionMetadata` (built once per step by the model runner, shared by all layers) and
`paged_attention` (write this step's K/V into the cache slots, then attend every query row to its
request's cached prefix plus the causal part of its own new rows).

Row layout: the runner's flat batch need not keep a request's rows together (it puts every MASK
row last, so the gated LoRA sees one slice). Metadata is built from the rows in *request order*
(request i's `q_lens[i]` rows in causal order) and `row_of`, the flat row of each; everything is
tensor ops over all requests at once, with no per-request Python tensor building.

Queries of all requests are gathered into one padded batch so each layer runs one SDPA call;
requests with long query chunks (prefill) run alone so one long prompt does not pad every decode
block to its length. When a group's padded rows already are the flat batch in order (one request
with its rows in place: the C=1 decode step), the gather and scatter are skipped.

MASK groups (`draft_anchors="every"`): a request's MASK rows may be g groups of s rows, group a
anchored at clean row `clean - g + a` (the pending token for a = 0, then each draft). Group a's
row i sits at position `ctx + clean - g + a + 1 + i` and sees the request's keys up to its anchor
and its own group's rows up to itself, nothing else: exactly what a cold round after that anchor
would see. Keys stay in request order (group rows write the cache slots after the clean rows, as
a single group does), so only the positions and the mask differ from the causal layout; the
clean rows are causal as always and never see a MASK row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.batch_layout import request_rows
from workers.models.linear import INVARIANT_ROWS

_KEY_PAD = 64
"""`invariant_attention` pads each group's keys to a multiple of this (see there)."""

# Query chunks longer than this are attended one request at a time (see module docstring).
_SOLO_Q_LEN = 64


@dataclass
class _Group:
    q_index: torch.Tensor | None  # [B, Lq] flat row of each query (padded with 0); None: identity
    kv_slots: torch.Tensor  # [B, Lk] cache slot of each key position (padded with 0)
    mask: torch.Tensor  # [B, 1, Lq, Lk] True where attention is allowed
    out_index: torch.Tensor | None  # [n_valid] positions in [B*Lq] that are real queries
    out_rows: torch.Tensor | None  # [n_valid] their flat rows


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot where each flat row's K/V is written
    positions: torch.Tensor  # [T] absolute position of each flat row
    groups: list[_Group]
    num_tokens: int
    invariant: bool = False  # attend with `invariant_attention` (bf16/fp16 on the CPU)

    @classmethod
    def build(
        cls,
        q_lens: list[int],
        ctx_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        row_of: torch.Tensor | None = None,
        clean_lens: list[int] | None = None,
        mask_groups: list[int] | None = None,
        invariant: bool = False,
    ) -> AttentionMetadata:
        """q_lens[i] new rows of request i follow its ctx_lens[i] cached tokens. `row_of` [T]: flat
        row of each request-order row (None: requests' rows are consecutive, in order).
        `clean_lens[i]` / `mask_groups[i]`: request i's last q_lens[i] - clean_lens[i] rows are
        mask_groups[i] MASK groups (module docstring); None: every request causal. `invariant`:
        attend with `invariant_attention` (keys padded here, once per step, to its multiple)."""
        width = max((len(t) for t in block_tables), default=1) or 1
        bt = torch.tensor([t + [0] * (width - len(t)) for t in block_tables] or [[0]], dtype=torch.long)  # [B, W]
        ql = torch.tensor(q_lens, dtype=torch.long)  # [B]
        ctx = torch.tensor(ctx_lens, dtype=torch.long)  # [B]
        T = sum(q_lens)
        qs = torch.cumsum(ql, 0) - ql  # [B] first request-order row of each request
        rid, j, pos_ro, slot_ro = request_rows(ql, ctx, bt, block_size, T)  # [T] each, request order
        anchors = None
        if mask_groups is not None and any(g > 1 for g in mask_groups):
            cl = torch.tensor(clean_lens, dtype=torch.long)  # [B]
            g = torch.tensor(mask_groups, dtype=torch.long).clamp(min=1)  # [B]
            s = ((ql - cl) // g).clamp(min=1)  # [B] rows per group
            anchors = (cl, g, s)
            t = j - cl[rid]  # [T] index among the request's MASK rows (< 0: a clean row)
            grp = t.clamp(min=0) // s[rid]
            pos_ro = torch.where(t >= 0, ctx[rid] + cl[rid] - g[rid] + grp + 1 + t.clamp(min=0) % s[rid], pos_ro)
        identity_rows = row_of is None
        if row_of is None:
            row_of = torch.arange(T)
        slot_mapping = torch.empty(T, dtype=torch.long)
        slot_mapping[row_of] = slot_ro
        positions = torch.empty(T, dtype=torch.long)
        positions[row_of] = pos_ro
        groups = []
        solo = (ql > _SOLO_Q_LEN).nonzero().flatten().tolist()
        for i in solo:
            groups.append(_group(torch.tensor([i]), ql, ctx, qs, bt, row_of, block_size, T, identity_rows, device, anchors,
                                 _KEY_PAD if invariant else 1))
        packed = (ql <= _SOLO_Q_LEN).nonzero().flatten()
        if packed.numel():
            groups.append(_group(packed, ql, ctx, qs, bt, row_of, block_size, T, identity_rows, device, anchors,
                                 _KEY_PAD if invariant else 1))
        return cls(slot_mapping=slot_mapping.to(device), positions=positions.to(device), groups=groups, num_tokens=T,
                   invariant=invariant)

    def attend(self, q, k, v, k_cache, v_cache, scale: float) -> torch.Tensor:
        return paged_attention(q, k, v, k_cache, v_cache, self, scale)


def _group(idx, ql, ctx, qs, bt, row_of, block_size, T, identity_rows, device, anchors=None, key_multiple=1) -> _Group:
    """Padded query/key layout of requests `idx` [B] for one SDPA call (keys: to `key_multiple`)."""
    q, c = ql[idx], ctx[idx]  # [B]
    B, Lq, Lk = idx.numel(), int(q.max()), int((c + q).max())
    Lk += -Lk % key_multiple
    jq = torch.arange(Lq)
    valid = jq[None, :] < q[:, None]  # [B, Lq]
    ro = (qs[idx][:, None] + jq[None, :]).clamp(max=max(T - 1, 0))
    q_index = torch.where(valid, row_of[ro], 0)  # [B, Lq]
    k = torch.arange(Lk)
    kcol = (k // block_size).clamp(max=bt.shape[1] - 1)
    kv_slots = torch.where(k[None, :] < (c + q)[:, None], bt[idx][:, kcol] * block_size + k % block_size, 0)  # [B, Lk]
    # query j sits at absolute position c + j and sees keys 0..c+j (strict causal); padded query
    # rows attend key 0 only so softmax stays finite (their output is dropped)
    last = c[:, None] + jq[None, :]  # [B, Lq] the query's own key index
    mask = k[None, None, :] <= last[:, :, None]
    if anchors is not None:
        # a MASK group's row: keys up to its anchor, then its own group's rows up to itself
        cl, g, s = (a[idx][:, None] for a in anchors)  # [B, 1] each
        t = jq[None, :] - cl  # [B, Lq]
        grp = t.clamp(min=0) // s
        anchor = torch.where(t >= 0, c[:, None] + cl - g + grp, last)
        own = torch.where(t >= 0, c[:, None] + cl + grp * s, last + 1)
        mask = (k[None, None, :] <= anchor[:, :, None]) | ((k[None, None, :] >= own[:, :, None]) & mask)
    mask &= valid[:, :, None]
    mask |= (~valid)[:, :, None] & (k == 0)[None, None, :]
    in_place = B * Lq == T and bool(valid.all()) and (identity_rows or bool((q_index.flatten() == torch.arange(T)).all()))
    if in_place:
        return _Group(None, kv_slots.to(device), mask[:, None].to(device), None, None)
    out_index = valid.flatten().nonzero().squeeze(1)
    return _Group(
        q_index=q_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask[:, None].to(device),
        out_index=out_index.to(device),
        out_rows=q_index.flatten()[out_index].to(device),
    )


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    Hq, D = q.shape[1], q.shape[2]
    out = None
    for g in meta.groups:
        B, _, Lq, _ = g.mask.shape
        qb = (q.view(B, Lq, Hq, D) if g.q_index is None else q[g.q_index]).transpose(1, 2)  # [B, Hq, Lq, D]
        kb = k_cache[g.kv_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, Lk, D]
        vb = v_cache[g.kv_slots].transpose(1, 2).to(q.dtype)
        if meta.invariant:
            ob = invariant_attention(qb, kb, vb, g.mask, scale)
        else:
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=g.mask, scale=scale, enable_gqa=kb.shape[1] != Hq)
        ob = ob.transpose(1, 2).reshape(B * Lq, Hq, D)  # [B*Lq, Hq, D]
        if g.q_index is None:
            return ob  # the only group: its rows are the flat batch
        if out is None:
            out = torch.empty_like(q)
        out[g.out_rows] = ob[g.out_index]
    return out


def invariant_attention(
    q: torch.Tensor,  # [B, Hq, Lq, D] bf16/fp16
    k: torch.Tensor,  # [B, Hkv, Lk, D]
    v: torch.Tensor,  # [B, Hkv, Lk, D]
    mask: torch.Tensor,  # [B, 1, Lq, Lk] True = attend
    scale: float,
) -> torch.Tensor:  # [B, Hq, Lq, D]
    """Attention whose every query row is computed the same whatever the batch, the query count and
    the key padding (batch invariance in bf16 on the CPU, DESIGN §1): SDPA's CPU kernel picks its
    blocking from the shapes, so a row's output changes with them. Here both products run on
    oneDNN's reduced-precision GEMM, whose rows do not depend on the other rows or on trailing zero
    columns, and the softmax (fp32) adds the padded keys' zeros at the end of each row. Scores are
    the GEMM's bf16 output (as in HF's eager attention), the probabilities bf16 for the second
    product (as in SDPA's flash kernel). tests/workers/test_batch_invariance.py checks the rows."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv  # query heads per KV head: query head h reads KV head h // g
    # keys padded (masked) to a multiple of _KEY_PAD (AttentionMetadata pads them once per step):
    # torch's elementwise kernels run the last numel % vector-width elements of a tensor through
    # the scalar op, whose exp differs from the vector one in the last bit; with whole vectors
    # only, no key's exp depends on the shapes
    pad = -k.shape[2] % _KEY_PAD
    if pad:
        k, v, mask = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)
    Lk = k.shape[2]
    # A KV head's g query heads share one product, m query rows each, g*m <= INVARIANT_ROWS: the
    # row count up to which oneDNN's bf16 rows do not depend on it. Operands are contiguous (a
    # strided one can take another GEMM path, e.g. the C=1 step's transposed q).
    m = max(1, INVARIANT_ROWS // g)
    qg = q.reshape(B, Hkv, g, Lq, D)
    kt = k.transpose(-1, -2).contiguous()  # [B, Hkv, D, Lk]
    # V with a column of ones: the same product gives each row's softmax denominator, summed like
    # the numerator (a padded key adds an exact zero to both; torch.softmax's own sum changes
    # with the row length)
    v1 = torch.cat([v, v.new_ones(B, Hkv, Lk, 1)], dim=-1)  # [B, Hkv, Lk, D+1]
    blocked = ~mask[:, :, None]  # [B, 1, 1, Lq, Lk]
    outs = []
    for lo in range(0, Lq, m):
        hi = min(Lq, lo + m)
        qc = qg[:, :, :, lo:hi].reshape(B, Hkv, g * (hi - lo), D)  # a copy: contiguous
        s = torch.matmul(qc, kt).float().view(B, Hkv, g, hi - lo, Lk)  # scores (bf16 products)
        s = s.mul_(scale).masked_fill_(blocked[..., lo:hi, :], float("-inf"))
        p = (s - s.amax(dim=-1, keepdim=True)).exp_().to(q.dtype)  # unnormalised, max 1
        outs.append(torch.matmul(p.view(B, Hkv, g * (hi - lo), Lk), v1).view(B, Hkv, g, hi - lo, D + 1))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    o = o[..., :D].float() / o[..., D:].float()
    return o.to(q.dtype).view(B, Hq, Lq, D)


def dense_attention(
    q: torch.Tensor,  # [B, L, Hq, D]
    k: torch.Tensor,  # [B, L, Hkv, D]
    v: torch.Tensor,  # [B, L, Hkv, D]
    mask: torch.Tensor | None,  # [B, L, L] bool (True = attend) or None for plain causal
    scale: float,
) -> torch.Tensor:  # [B, L, Hq, D]
    """No-cache attention for training and reference checks (custom masks, e.g. I-DLM's block mask)."""
    qb, kb, vb = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kb.shape[1] != qb.shape[1]
    if mask is None:
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)
