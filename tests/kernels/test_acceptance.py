"""Triton acceptance kernels (`idlm_kernels.acceptance`) against the torch reference.

CPU: the Triton interpreter (`TRITON_INTERPRET=1`, set below and in tests/conftest.py before triton
is imported). CUDA: the same comparisons, marked `gpu` (run with `-m gpu`). Both implementations
draw the same counter-based random numbers, so outputs are compared for *equality*; the only
allowed differences are near-ties (the kernels sum softmax normalisers in another order and use
another exp/log), which `assert_equal_or_near_tie` characterises. The residual law is also checked
statistically against its exact form (chi-square, 20k samples, fixed seeds)."""

import os

if not os.path.exists("/dev/nvidia0"):  # no GPU: Triton must run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from scipy.stats import chisquare  # noqa: E402

from idlm_kernels import rng  # noqa: E402
from idlm_kernels.acceptance import _stats, sample_triton, verify_triton  # noqa: E402
from idlm_kernels.acceptance_ref import PLACEHOLDER, SamplingMetadata, processed_probs, sample_ref, verify_ref  # noqa: E402
from tests.kernels.test_acceptance_ref import mixed_case  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Differences allowed only at near-ties (see module docstring): at most this fraction of requests,
# and each must be explained by a relative gap below NEAR_TIE.
MAX_MISMATCH_FRACTION = 1e-3
NEAR_TIE = 1e-4


def _meta(B, T, top_k=-1, top_p=1.0, seed0=0, step=None, device="cpu"):
    return SamplingMetadata(
        temperature=torch.full((B,), float(T), device=device),
        top_k=torch.full((B,), top_k, dtype=torch.long, device=device),
        top_p=torch.full((B,), float(top_p), device=device),
        key=torch.tensor([rng.request_key(seed0 + i) for i in range(B)], device=device),
        step=(torch.arange(B) if step is None else torch.full((B,), step)).to(device),
    )


def _to(case, device):
    t, d, ids, ks, m = case
    return t.to(device), d.to(device), ids.to(device), ks, SamplingMetadata(*(x.to(device) for x in vars(m).values()))


def _uniform_case(B, K, V, T, top_k, top_p, seed, dtype=torch.float32):
    t, d, ids, ks, _ = mixed_case(B, K, V, seed, dtype=dtype)
    return t, d, ids, ks, _meta(B, T, top_k, top_p, seed0=seed)


def _near_tie(case, b, out_t, n_t, out_r, n_r) -> bool:
    """Is request b's difference between Triton and the reference explained by a near-tie of the
    reference's own numbers (an accept test u*q(d) vs p(d), or the top of the race, within
    NEAR_TIE relative)? Recomputes the reference quantities for that one request."""
    target, draft, ids, ks, meta = (x.cpu() if torch.is_tensor(x) else x for x in case)
    k, t0, d0 = ks[b], sum(ks[:b]) + b, sum(ks[:b])
    m = meta.rows(torch.full((k + 1,), b))
    p = processed_probs(target[t0 : t0 + k + 1], m.temperature, m.top_k, m.top_p).double()
    q = processed_probs(draft[d0 : d0 + k], m.temperature[:k], m.top_k[:k], m.top_p[:k]).double() if k else None
    d = ids[d0 : d0 + k]
    if int(n_t) != int(n_r):  # an accept decision differs, at the earlier stopping position
        first = min(int(n_t), int(n_r)) - 1
        u = rng.scalar_uniforms(rng.row_hash(m.key[:1], m.step[:1], torch.tensor([first * 4]))).double()
        a, c = float(u * q[first, d[first]]), float(p[first, d[first]])
        return abs(a - c) <= NEAR_TIE * max(a, c)
    j = int(n_r) - 1  # same decisions, different token: the race at position j
    w = (p[j] - q[j]).clamp(min=0) if j < k else p[j]
    if j < k and not bool((w > 0).any()):
        w = p[j]
    base = rng.row_hash(m.key[:1], m.step[:1], torch.tensor([j * 4 + rng.PURPOSE_SAMPLE]))
    e = -torch.log(rng.row_uniforms(base, p.shape[1])[0].double())
    score, tok = w / e, int(out_t[j])
    scale = (p[j] + (q[j] if j < k else 0)) / e  # rounding of p - q scales with p and q, not with w
    return float(score.max() - score[tok]) <= NEAR_TIE * float(scale[tok]) + 1e-30


def assert_equal_or_near_tie(case, got, want):
    (out_t, n_t), (out_r, n_r) = got, want
    assert out_t.shape == out_r.shape and out_t.dtype == torch.long and n_t.dtype == torch.long
    bad = (~((out_t == out_r).all(1) & (n_t == n_r))).nonzero().squeeze(1).tolist()
    assert len(bad) <= MAX_MISMATCH_FRACTION * len(n_r) + (1 if torch.device(out_t.device).type == "cuda" else 0), (
        f"{len(bad)} of {len(n_r)} requests differ: {bad[:10]}")
    for b in bad:
        assert _near_tie(case, b, out_t[b].cpu(), n_t[b].cpu(), out_r[b].cpu(), n_r[b].cpu()), f"request {b} differs, no near-tie"
    # shape of the output: accepted drafts, one emitted token, PLACEHOLDER after it
    B, K1 = out_t.shape
    pos = torch.arange(K1, device=out_t.device)[None, :]
    assert bool(((out_t == PLACEHOLDER) == (pos >= n_t[:, None])).all())
    assert bool(((n_t >= 1) & (n_t <= K1)).all())


# --- comparison with the reference --------------------------------------------------------------

PARAMS = [(0.0, -1, 1.0), (1.0, -1, 1.0), (0.7, 1, 1.0), (1.2, 5, 0.9), (1.0, -1, 1e-4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,K,V", [(1, 1, 50), (5, 3, 1500), (8, 7, 1000), (256, 1, 40), (256, 7, 33)])
@pytest.mark.parametrize("T,top_k,top_p", PARAMS)
def test_verify_equals_reference(device, B, K, V, T, top_k, top_p):
    """k = 1 and 7 drafts (N = 2, 8), 1 and 256 requests, vocab not a multiple of the block."""
    case = _to(_uniform_case(B, K, V, T, top_k, top_p, seed=B * 100 + K), device)
    assert_equal_or_near_tie(case, verify_triton(*case), verify_ref(*case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,K,V,seed", [(64, 7, 257, 3), (256, 3, 50, 4), (40, 1, 1000, 5), (33, 7, 1500, 8)])
@pytest.mark.parametrize("greedy_frac", [0.0, 0.3])
def test_verify_mixed_batch_equals_reference(device, B, K, V, seed, greedy_frac):
    """Per-request temperature / top-k / top-p / keys / steps, greedy and sampled in one batch."""
    case = _to(mixed_case(B, K, V, seed, greedy_frac=greedy_frac), device)
    assert_equal_or_near_tie(case, verify_triton(*case), verify_ref(*case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("greedy_frac", [1.0, 0.0])
def test_verify_logit_dtypes(device, dtype, greedy_frac):
    case = _to(mixed_case(48, 3, 700, 5, greedy_frac=greedy_frac, match_frac=0.8, dtype=dtype), device)
    assert_equal_or_near_tie(case, verify_triton(*case), verify_ref(*case))


@pytest.mark.parametrize("device", DEVICES)
def test_verify_many_requests_all_rejecting(device):
    """20k sampled requests, drafts mostly rejected: the residual path at scale, fp32/bf16/fp16."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case = _to(mixed_case(20000, 3, 48, 21, greedy_frac=0.1, match_frac=0.2, dtype=dtype), device)
        assert_equal_or_near_tie(case, verify_triton(*case), verify_ref(*case))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_equals_reference(device):
    g = torch.Generator().manual_seed(3)
    lg = torch.randn(400, 1100, generator=g).to(device)
    m = mixed_case(8, 1, 10, 5, greedy_frac=0.0)[-1]
    m.temperature[1] = 0.0
    m.top_k[2], m.top_p[3] = 3, 0.5
    m = SamplingMetadata(*(x.to(device) for x in vars(m).values()))
    ri, st = (torch.arange(400) % 8).to(device), (torch.arange(400) // 8).to(device)
    for purpose in (rng.PURPOSE_DRAFT, rng.PURPOSE_SAMPLE):
        got, want = sample_triton(lg, ri, st, m, purpose), sample_ref(lg, ri, st, m, purpose)[0]
        assert int((got != want).sum()) <= (1 if device == "cuda" else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probabilities_match_reference(device, dtype):
    """The kernel's truncated softmax (threshold, max, sum per row) reproduces processed_probs
    within float tolerance, for every truncation setting."""
    g = torch.Generator().manual_seed(4)
    lg = (torch.randn(40, 777, generator=g) * 3).to(dtype).to(device)
    T = (torch.rand(40, generator=g) + 0.3).to(device)
    tk = torch.tensor([-1, 1, 5, 50] * 10).to(device)
    tp = torch.tensor([1.0, 1.0, 0.9, 1e-4, 0.5] * 8).to(device)
    st = _stats(lg, None, T, tk, tp)
    x = lg.float() / T[:, None]
    p = torch.where(x >= st[0][:, None], torch.exp(x - st[1][:, None]) / st[2][:, None], torch.zeros_like(x))
    ref = processed_probs(lg, T, tk, tp)
    assert torch.equal(p > 0, ref > 0)
    torch.testing.assert_close(p, ref, rtol=2e-5, atol=1e-7)


# --- literal cases and edge cases ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_literal_table(device):
    V = 6
    # request 0: drafts [2, 4], target argmaxes [2, 4, 1] -> both accepted + bonus 1
    # request 1: drafts [3],    target argmaxes [0, 5]    -> rejected at 0, correction 0
    # request 2: no drafts,     target argmax  [5]        -> bonus 5
    # request 3: drafts [1, 1], target argmaxes [1, 3, 2] -> 1 accepted, correction 3
    am = [2, 4, 1, 0, 5, 5, 1, 3, 2]
    target = torch.full((len(am), V), -1.0)
    target[torch.arange(len(am)), torch.tensor(am)] = 1.0
    target[3, 4] = 1.0  # tie in request 1's row: the first index (0) wins
    out, n = verify_triton(target.to(device), None, torch.tensor([2, 4, 3, 1, 1], device=device), [2, 1, 0, 2],
                           _meta(4, 0.0, device=device))
    assert n.tolist() == [3, 1, 1, 2]
    assert out.tolist() == [[2, 4, 1], [0, PLACEHOLDER, PLACEHOLDER], [5, PLACEHOLDER, PLACEHOLDER], [1, 3, PLACEHOLDER]]


@pytest.mark.parametrize("device", DEVICES)
def test_p_equals_q_accepts_everything(device):
    V, B = 64, 32
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2 * B, V, generator=g)
    draft = target[0::2].clone()  # q == p bit for bit (same rows, same kernel)
    d = torch.multinomial(torch.softmax(draft, -1), 1, generator=g).squeeze(1)
    case = _to((target, draft, d, [1] * B, _meta(B, 1.0)), device)
    out, n = verify_triton(*case)
    assert bool((n == 2).all())  # u * q < p = q for every u < 1
    assert_equal_or_near_tie(case, (out, n), verify_ref(*case))


@pytest.mark.parametrize("device", DEVICES)
def test_q_zero_at_the_draft(device):
    """q(d) = 0 (a one-hot proposal elsewhere): accept iff p(d) > 0; p(d) = 0 under top_k = 1."""
    V, B = 64, 32
    g = torch.Generator().manual_seed(2)
    target = torch.randn(2 * B, V, generator=g)
    onehot = torch.full((B, V), float("-inf"))
    onehot[:, 0] = 0.0
    d = torch.full((B,), 3)
    target[0::2, 3] = target[0::2].max(-1).values - 1  # d is never the argmax
    for top_k, accepted in ((-1, True), (1, False)):
        case = _to((target, onehot, d, [1] * B, _meta(B, 1.0, top_k=top_k)), device)
        out, n = verify_triton(*case)
        assert bool((n == (2 if accepted else 1)).all())
        if not accepted:  # residual max(0, p - q) with p one-hot at the argmax
            assert torch.equal(out[:, 0].cpu(), target[0::2].argmax(-1))
        assert_equal_or_near_tie(case, (out, n), verify_ref(*case))


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_1_and_tiny_top_p_are_greedy_like(device):
    """With top_k = 1 or top_p -> 0, p is one-hot at the argmax: the result is the greedy one."""
    case = _uniform_case(64, 3, 300, 1.0, -1, 1.0, seed=7)
    t, dl, d, ks, _ = _to(case, device)
    greedy = verify_triton(t, dl, d, ks, _meta(64, 0.0, device=device))
    for top_k, top_p in ((1, 1.0), (-1, 1e-6)):
        out, n = verify_triton(t, dl, d, ks, _meta(64, 1.0, top_k, top_p, device=device))
        # drafts that are the argmax are accepted with prob 1 only if q(d) <= p(d) = 1, always true;
        # others have p(d) = 0 and are rejected; the residual is one-hot at the argmax.
        assert torch.equal(n, greedy[1]) and torch.equal(out, greedy[0])


# --- randomness: seeds, streams, batch invariance -----------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_determinism_and_batch_invariance(device):
    case = _to(mixed_case(64, 3, 200, 9, greedy_frac=0.0, match_frac=0.0), device)
    a, b = verify_triton(*case), verify_triton(*case)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # request 5 alone gives what it gave inside the batch: its output depends only on its own
    # key / step and rows, never on its batch mates
    t, dl, d, ks, m = case
    t0, d0, k = sum(ks[:5]) + 5, sum(ks[:5]), ks[5]
    alone = verify_triton(t[t0 : t0 + k + 1], dl[d0 : d0 + k], d[d0 : d0 + k], [k], m.rows(torch.tensor([5], device=device)))
    assert alone[0][0, : k + 1].tolist() == a[0][5, : k + 1].tolist() and int(alone[1][0]) == int(a[1][5])


@pytest.mark.parametrize("device", DEVICES)
def test_requests_never_share_a_stream(device):
    """Identical logits, different keys (or the same key at another step): different draws."""
    V, B = 50, 400
    lg = torch.zeros(B, V, device=device)  # uniform distribution
    ri, st = torch.arange(B, device=device), torch.zeros(B, dtype=torch.long, device=device)
    toks = sample_triton(lg, ri, st, _meta(B, 1.0, step=0, device=device), rng.PURPOSE_SAMPLE)
    assert len(set(toks.tolist())) > 40  # ~ all 50 tokens seen across 400 keys
    same_key = _meta(B, 1.0, device=device)
    same_key.key[:] = rng.request_key(42)  # one seed, steps 0..B-1
    assert len(set(sample_triton(lg, ri, st, same_key, rng.PURPOSE_SAMPLE).tolist())) > 40
    same_key.step[:] = 7  # one seed, one step: every row draws the same token
    assert len(set(sample_triton(lg, ri, st, same_key, rng.PURPOSE_SAMPLE).tolist())) == 1
    # and the streams of different purposes / positions are different too
    other = sample_triton(lg, ri, torch.ones_like(st), _meta(B, 1.0, step=0, device=device), rng.PURPOSE_SAMPLE)
    assert float((other == toks).float().mean()) < 0.1


# --- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_residual_and_output_distribution(device):
    """20k single-draft requests, the draft sampled from q: acceptance rate = sum min(p, q), the
    token emitted after a rejection follows normalize(max(0, p - q)), and the first emitted token
    follows p exactly (the point of speculative sampling). Chi-square with fixed seeds."""
    V, n = 12, 20000
    g = torch.Generator().manual_seed(0)
    p_l = torch.randn(2, V, generator=g) * 1.5
    q_l = torch.randn(1, V, generator=g) * 1.5
    one = torch.ones(1)
    p = processed_probs(p_l[:1], one, -one.long(), one)[0].double()
    q = processed_probs(q_l, one, -one.long(), one)[0].double()
    d = torch.multinomial(q.float(), n, replacement=True, generator=g)
    meta = _meta(n, 1.0, seed0=123, device=device)
    out, num = verify_triton(p_l.repeat(n, 1).to(device), q_l.repeat(n, 1).to(device), d.to(device), [1] * n, meta)
    out, num = out.cpu(), num.cpu()
    acc = float((num == 2).double().mean())
    expect_acc = float(torch.minimum(p, q).sum())
    assert abs(acc - expect_acc) < 4 * (expect_acc * (1 - expect_acc) / n) ** 0.5
    rej = out[num == 1, 0]
    resid = (p - q).clamp(min=0)
    resid /= resid.sum()
    counts = torch.bincount(rej, minlength=V).double()
    support = resid > 0
    assert counts[~support].sum() == 0  # never a token with p <= q after a rejection
    assert chisquare(counts[support].numpy(), (resid[support] * counts.sum()).numpy()).pvalue > 1e-3
    first = torch.bincount(out[:, 0], minlength=V).double()
    assert chisquare(first.numpy(), (p / p.sum() * n).numpy()).pvalue > 1e-3
    tv = 0.5 * float((first / n - p).abs().sum())
    assert tv < 0.02


# --- launcher checks ----------------------------------------------------------------------------


def test_launcher_rejects_bad_inputs():
    t, dl, d, ks, m = _uniform_case(4, 2, 30, 1.0, -1, 1.0, seed=1)
    with pytest.raises(AssertionError, match="rows"):
        verify_triton(t[:-1], dl, d, ks, m)
    with pytest.raises(AssertionError, match="dtype"):
        verify_triton(t.double(), dl, d, ks, m)
    with pytest.raises(AssertionError, match="contiguous"):
        verify_triton(t.t().contiguous().t(), dl, d, ks, m)
    with pytest.raises(AssertionError, match="draft_token_ids"):
        verify_triton(t, dl, d.int(), ks, m)
    with pytest.raises(AssertionError, match="draft_logits"):
        verify_triton(t, None, d, ks, m)
    with pytest.raises(AssertionError, match="meta.temperature"):
        verify_triton(t, dl, d, ks, m.rows(torch.arange(3)))
    with pytest.raises(AssertionError, match="req_index"):
        sample_triton(t, torch.arange(3), torch.arange(3), m, 1)


def test_empty_batch_and_no_drafts():
    t, dl, d, ks, m = _uniform_case(6, 0, 30, 1.0, -1, 1.0, seed=2)
    out, n = verify_triton(t, None, d, ks, m)
    assert out.shape == (6, 1) and bool((n == 1).all())
    assert torch.equal(out, verify_ref(t, None, d, ks, m)[0])
    out, n = verify_triton(torch.zeros(0, 8), None, torch.zeros(0, dtype=torch.long), [], m.rows(torch.arange(0)))
    assert out.shape == (0, 1) and n.shape == (0,)
