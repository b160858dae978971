"""Triton acceptance kernels vs the torch reference (CPU: Triton interpreter, `TRITON_INTERPRET=1`
set in tests/conftest.py; CUDA: the same comparisons, marked gpu). Both draw the same counter-based
random numbers, so outputs must be *identical*, not just close; the residual distribution is also
checked statistically against its exact law."""

import pytest
import torch
from scipy.stats import chisquare

from kernels import SamplingMetadata, processed_probs
from kernels.acceptance import sample_triton, verify_triton
from kernels.acceptance_ref import PLACEHOLDER, sample_ref, verify_ref
from kernels.rng import request_key

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _meta(B, T, top_k=-1, top_p=1.0, seed0=0, device="cpu"):
    return SamplingMetadata(
        temperature=torch.full((B,), float(T), device=device),
        top_k=torch.full((B,), top_k, dtype=torch.long, device=device),
        top_p=torch.full((B,), float(top_p), device=device),
        key=torch.tensor([request_key(seed0 + i) for i in range(B)], device=device),
        step=torch.arange(B, device=device),
    )


def _case(B, K, V, seed=0, dtype=torch.float32, match_frac=0.6, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(0, K + 1, (B,), generator=g).tolist()
    ks[0] = K
    target = (torch.randn(sum(ks) + B, V, generator=g) * 2).to(dtype)
    draft = (torch.randn(sum(ks), V, generator=g) * 2).to(dtype)
    d = torch.randint(0, V, (sum(ks),), generator=g)
    # make a fraction of drafts equal the target argmax so greedy acceptance runs deep
    am = target.float().argmax(-1)
    t0 = 0
    for b, k in enumerate(ks):
        for j in range(k):
            if torch.rand(1, generator=g).item() < match_frac:
                d[sum(ks[:b]) + j] = am[t0 + j]
        t0 += k + 1
    return [x.to(device) for x in (target, draft, d)] + [ks]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,K,V", [(1, 1, 50), (5, 3, 300), (8, 7, 1500), (256, 1, 40), (256, 7, 33)])
@pytest.mark.parametrize("T,top_k,top_p", [(0.0, -1, 1.0), (1.0, -1, 1.0), (0.7, 1, 1.0), (1.2, 5, 0.9), (1.0, -1, 1e-4)])
def test_verify_triton_equals_reference(device, B, K, V, T, top_k, top_p):
    target, draft, d, ks = _case(B, K, V, seed=B * 100 + K, device=device)
    meta = _meta(B, T, top_k, top_p, device=device)
    out_t, n_t = verify_triton(target, draft, d, ks, meta)
    out_r, n_r = verify_ref(target, draft, d, ks, meta)
    assert torch.equal(n_t, n_r)
    assert torch.equal(out_t, out_r)
    assert bool((out_t[torch.arange(B), n_t - 1] != PLACEHOLDER).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_low_precision_logits(dtype):
    target, draft, d, ks = _case(16, 3, 700, seed=5, dtype=dtype, match_frac=0.8)
    meta = _meta(16, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(verify_triton(target, draft, d, ks, meta), verify_ref(target, draft, d, ks, meta)))


def test_greedy_literal_table():
    V = 6
    # request 0: drafts [2, 4], target argmaxes [2, 4, 1] -> all accepted + bonus 1
    # request 1: drafts [3], target argmaxes [0, 5] -> reject at 0, correction 0
    am = [2, 4, 1, 0, 5]
    target = torch.full((5, V), -1.0)
    target[torch.arange(5), torch.tensor(am)] = 1.0
    out, n = verify_triton(target, None, torch.tensor([2, 4, 3]), [2, 1], _meta(2, 0.0))
    assert n.tolist() == [3, 1]
    assert out.tolist() == [[2, 4, 1], [0, PLACEHOLDER, PLACEHOLDER]]


def test_edge_q_zero_and_p_equals_q():
    V, B = 64, 32
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2 * B, V, generator=g)
    # p == q exactly: every draft is accepted (u * q < p = q for u < 1)
    target = logits.clone()
    drafts_l = logits[0::2].clone()
    d = torch.multinomial(torch.softmax(drafts_l, -1), 1, generator=g).squeeze(1)
    out, n = verify_triton(target, drafts_l, d, [1] * B, _meta(B, 1.0))
    assert (n == 2).all()
    assert torch.equal(out, verify_ref(target, drafts_l, d, [1] * B, _meta(B, 1.0))[0])
    # q(d) == 0 with p(d) > 0: accepted; with p(d) == 0 (top_k=1 elsewhere): rejected
    onehot = torch.full((B, V), float("-inf"))
    onehot[:, 0] = 0.0
    d2 = torch.full((B,), 3)
    a = verify_triton(target, onehot, d2, [1] * B, _meta(B, 1.0))
    b = verify_ref(target, onehot, d2, [1] * B, _meta(B, 1.0))
    assert torch.equal(a[0], b[0]) and (a[1] == 2).all()


def test_seeded_determinism_and_independent_streams():
    target, draft, d, ks = _case(64, 3, 200, seed=9, match_frac=0.0)
    meta = _meta(64, 1.0)
    meta.step[:] = 0
    meta.key[:] = request_key(42)  # same seed, same round: identical results in every row
    out, n = verify_triton(target[: 4], draft[: 3], d[: 3], [3], SamplingMetadata(*(t[:1] for t in (meta.temperature, meta.top_k, meta.top_p, meta.key, meta.step))))
    out2, n2 = verify_triton(target[: 4], draft[: 3], d[: 3], [3], SamplingMetadata(*(t[:1] for t in (meta.temperature, meta.top_k, meta.top_p, meta.key, meta.step))))
    assert torch.equal(out, out2)
    # different keys on the same logits give different samples
    V = 50
    lg = torch.zeros(200, V)
    m = _meta(200, 1.0)
    m.step[:] = 0
    toks = sample_triton(lg, torch.arange(200), torch.zeros(200, dtype=torch.long), m, 1)
    assert len(set(toks.tolist())) > 20


def test_sample_triton_equals_reference():
    g = torch.Generator().manual_seed(3)
    lg = torch.randn(40, 1100, generator=g)
    m = _meta(8, 1.0)
    m.temperature[1] = 0.0
    m.top_k[2] = 3
    m.top_p[3] = 0.5
    ri = torch.arange(40) % 8
    st = torch.arange(40) // 8
    assert torch.equal(sample_triton(lg, ri, st, m, 2), sample_ref(lg, ri, st, m, 2)[0])


def test_residual_distribution_triton():
    """Single-draft requests whose draft is rejected often: the committed token must follow p.
    20k samples on CUDA; 4k under the CPU interpreter (it runs each program in Python). The
    reference path is tested with 20k samples in tests/workers/test_sampling_exactness.py."""
    V, n = 12, (20000 if torch.cuda.is_available() else 4000)
    g = torch.Generator().manual_seed(0)
    p_l = torch.randn(2, V, generator=g) * 1.5
    q_l = torch.randn(1, V, generator=g) * 1.5
    one = torch.ones(2)
    p = processed_probs(p_l, one, -one.long(), one)
    q = processed_probs(q_l, one[:1], -one[:1].long(), one[:1])[0]
    d = torch.multinomial(q, n, replacement=True, generator=g)
    out, num = verify_triton(p_l.repeat(n, 1), q_l.repeat(n, 1), d, [1] * n, _meta(n, 1.0, seed0=123))
    counts = torch.bincount(out[:, 0], minlength=V).double()
    assert (num == 1).sum() > n // 4  # many rejections: the residual path is exercised
    expected = p[0].double() / p[0].double().sum() * counts.sum()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
