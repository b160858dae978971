"""The lean small-block forward: fused projections, the CPU GEMM backend, the gated LoRA on the
tail slice of MASK rows, and the runner's flat layout (clean rows first, every MASK row last)."""

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import tiny_loaded
from workers.attention import AttentionMetadata
from workers.loader import fuse_state_dict, hf_shapes, load_model
from workers.model_runner import _row_of
from workers.models.linear import LoRALinear, cpu_gemm_backend, onednn_linear, row_bucket

BACKENDS = ["onednn", "mkl", "torch"]


@pytest.fixture(params=BACKENDS)
def gemm(request, monkeypatch):
    monkeypatch.setenv("IDLM_CPU_GEMM", request.param)
    return request.param


def _flat_batch(loaded, masks_per_req=(3, 3, 0), clean_per_req=(4, 2, 5), ctx=(6, 9, 3)):
    """A ragged flat batch in the runner's layout: every request's clean rows first (item order),
    then every MASK row; returns the model inputs and the KV caches, filled by a prefill."""
    cfg, model = loaded.config, loaded.model
    g = torch.Generator().manual_seed(3)
    B, bs = len(clean_per_req), 16
    tables = [[2 * i, 2 * i + 1] for i in range(B)]
    kv = [(torch.zeros(2 * B * bs, cfg.num_kv_heads, cfg.head_dim), torch.zeros(2 * B * bs, cfg.num_kv_heads, cfg.head_dim))
          for _ in range(cfg.num_layers)]
    with torch.inference_mode():  # cached prefixes of each request
        ids = torch.randint(0, cfg.vocab_size - 1, (sum(ctx),), generator=g)
        meta = AttentionMetadata.build(list(ctx), [0] * B, tables, bs)
        model(ids, meta.positions, kv_caches=kv, meta=meta)
    clean = [torch.randint(0, cfg.vocab_size - 1, (n,), generator=g).tolist() for n in clean_per_req]
    q_lens = [c + m for c, m in zip(clean_per_req, masks_per_req)]
    n_clean = sum(clean_per_req)
    ids = torch.tensor(sum(clean, []) + [loaded.mask_token_id] * sum(masks_per_req))
    row_of = _row_of(q_lens, list(clean_per_req), n_clean)
    meta = AttentionMetadata.build(q_lens, list(ctx), tables, bs, row_of=row_of)
    return ids, meta, kv, n_clean


def base_and_gated(loaded) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(hidden states without the adapter, with it, clean rows) of one paged engine-like step
    whose MASK rows are the tail slice: [T, hidden] each."""
    ids, meta, kv, n_clean = _flat_batch(loaded)
    m, out = loaded.model, []
    with torch.inference_mode():
        for lora in (False, True):
            m.has_lora = lora
            out.append(m(ids, meta.positions, kv_caches=[(k.clone(), v.clone()) for k, v in kv], meta=meta,
                         lora_from=n_clean))
    m.has_lora = False
    return out[0], out[1], n_clean


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gated_lora_clean_rows_bitwise_equal_to_the_base_path(family, gemm):
    """On the engine's paged path (MASK rows one tail slice, LoRA A merged into the base GEMM on
    oneDNN), every clean row's hidden state is bit-identical with and without the adapter."""
    base, gated, n_clean = base_and_gated(tiny_loaded(family, lora_rank=4))
    assert torch.equal(gated[:n_clean], base[:n_clean])
    assert (gated[n_clean:] - base[n_clean:]).abs().amax(-1).gt(0).all()  # every MASK row changed
    assert cpu_gemm_backend() == gemm


def test_tail_slice_path_equals_the_index_path():
    """The engine's slice path (in-place add, merged GEMM) and the dense/training index path give
    the same LoRA rows (to fp32 rounding) and identical clean rows."""
    loaded = tiny_loaded("qwen3", lora_rank=4)
    ids, meta, kv, n_clean = _flat_batch(loaded)
    m = loaded.model
    m.has_lora = True
    gate = torch.zeros(ids.shape[0], dtype=torch.bool)
    gate[n_clean:] = True
    with torch.inference_mode():
        fast = m(ids, meta.positions, kv_caches=[(k.clone(), v.clone()) for k, v in kv], meta=meta, lora_from=n_clean)
    with torch.no_grad():
        slow = m(ids, meta.positions, kv_caches=[(k.clone(), v.clone()) for k, v in kv], meta=meta, lora_mask=gate)
    m.has_lora = False
    assert torch.equal(fast[:n_clean], slow[:n_clean])
    torch.testing.assert_close(fast[n_clean:], slow[n_clean:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_path_with_lora_on_some_slices_and_after_an_in_place_update(dtype):
    """The engine's slice path (one product against the block-diagonal B^T) on a fused projection
    whose middle slice has no LoRA: MASK rows equal the index path's (to rounding), clean rows and
    the LoRA-free slice's columns are bitwise the base product, and an in-place change of a LoRA
    weight (an optimizer step) is seen by the next call (the cached plan is keyed by versions)."""
    torch.manual_seed(0)
    lin = LoRALinear(64, [("q", 48), ("k", 16), ("v", 32)]).to(dtype)
    lin.add_lora(4, 2.0, names=["q", "v"], init_b_zero=False)
    lin.requires_grad_(False)
    x = torch.randn(7, 64).to(dtype)
    gate = torch.arange(7) >= 4
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for _ in range(2):
        with torch.inference_mode():
            fast, base = lin(x, lora_rows=slice(4, None)), lin(x)
        with torch.no_grad():
            slow = lin(x, lora_rows=gate.nonzero().squeeze(1))
        assert torch.equal(fast[:4], base[:4]) and torch.equal(fast[4:, 48:64], base[4:, 48:64])
        torch.testing.assert_close(fast[4:], slow[4:], **tol)
        assert not torch.equal(fast[4:], base[4:])
        with torch.no_grad():
            lin.lora_B["v"].mul_(-3.0)  # in place: the next pass must see it


def test_flat_layout_matches_request_order_layout():
    """Putting MASK rows last changes nothing but row order: the same requests fed with each
    request's rows together (no LoRA, so only attention and positions are under test)."""
    loaded = tiny_loaded("llama")
    ids, meta, kv, n_clean = _flat_batch(loaded)
    row_of = _row_of([7, 5, 5], [4, 2, 5], n_clean)
    m = loaded.model
    with torch.inference_mode():
        tail = m(ids, meta.positions, kv_caches=[(k.clone(), v.clone()) for k, v in kv], meta=meta)
        ordered = AttentionMetadata.build([7, 5, 5], [6, 9, 3], [[0, 1], [2, 3], [4, 5]], 16)
        inorder = m(ids[row_of], ordered.positions, kv_caches=[(k.clone(), v.clone()) for k, v in kv], meta=ordered)
    torch.testing.assert_close(tail[row_of], inorder, rtol=1e-5, atol=1e-5)
    assert torch.equal(meta.positions[row_of], ordered.positions)


def test_onednn_linear_matches_f_linear_and_is_rebuilt_when_the_weight_changes(monkeypatch):
    lin = LoRALinear(48, [("a", 32), ("b", 16)])
    x = torch.randn(7, 48)
    with torch.inference_mode():
        y = lin(x)
    torch.testing.assert_close(y, F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in-place: a new version, so the packed copy is rebuilt
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), 2 * y, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("IDLM_CPU_GEMM", "nope")
    with pytest.raises(ValueError, match="^IDLM_CPU_GEMM"):
        with torch.inference_mode():
            lin(x)


def test_row_buckets_are_few_and_tight():
    counts = range(1, 4097)
    assert all(row_bucket(m) == m for m in range(1, 33))
    assert all(m <= row_bucket(m) <= 1.125 * m for m in counts)
    assert all(row_bucket(a) <= row_bucket(b) for a, b in zip(counts, counts[1:]))
    assert all(row_bucket(row_bucket(m)) == row_bucket(m) for m in counts)
    assert len({row_bucket(m) for m in counts}) == 88  # 32 exact, then 8 per octave up to 4096


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"), reason="no oneDNN linear in this torch")
@pytest.mark.parametrize("k,n", [(576, 992), (1536, 576), (64, 200)])
def test_bucketed_onednn_rows_are_bitwise_the_exact_products(k, n):
    """The zero rows appended to reach a bucket change no real row: each row's outputs equal the
    product at the exact row count, bit for bit (and the float64 product within fp32 rounding)."""
    g = torch.Generator().manual_seed(k)
    w, bias, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(700, k, generator=g)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    for m in (33, 37, 45, 63, 65, 100, 129, 333, 517, 700):
        assert row_bucket(m) > m
        exact = torch.ops.mkldnn._linear_pointwise(x[:m].contiguous(), packed, bias, "none", [], "")
        got = onednn_linear(x[:m], packed, bias)
        assert got.shape == (m, n) and torch.equal(got, exact), m
    # the right product: against float64, within fp32 accumulation error (~eps * sqrt(k) of the
    # output scale; which BLAS kernel runs, and so the rounding, depends on the CPU)
    ref = F.linear(x.double(), w.double(), bias.double())
    err = (got.double() - ref).abs().max().item()
    assert err <= 1e-6 * k**0.5 * ref.abs().max().item(), err


def test_gradients_flow_through_the_lora_and_not_the_packed_path():
    """Training keeps working: with grad enabled the base product is F.linear (autograd), the LoRA
    slices get gradients only in their own blocks, and the cached fused pair is not used."""
    lin = LoRALinear(16, [("q", 8), ("k", 4), ("v", 4)])
    for p in lin.parameters():
        p.requires_grad_(False)
    lin.add_lora(2, 1.0, ["q", "v"], init_b_zero=False)
    x = torch.randn(5, 16)
    rows = torch.tensor([3, 4])
    y = lin(x, rows)
    y.sum().backward()
    assert set(n for n, p in lin.named_parameters() if p.grad is not None) == {
        "lora_A.q", "lora_A.v", "lora_B.q", "lora_B.v"}
    ref = F.linear(x, lin.weight)
    for name, (lo, hi) in (("q", (0, 8)), ("v", (12, 16))):
        a, b = lin.lora_A[name], lin.lora_B[name]
        ref[3:, lo:hi] += (x[3:] @ a.t()) @ b.t()
    torch.testing.assert_close(y, ref)


def test_hf_checkpoint_names_map_to_fused_projections(tiny_qwen3_dir):
    model, cfg = load_model(tiny_qwen3_dir)
    shapes = hf_shapes(model)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    assert shapes["model.layers.1.mlp.up_proj.weight"] == (cfg.intermediate_size, cfg.hidden_size)
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in shapes)
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    fused = fuse_state_dict(model, sd)
    qkv = fused["model.layers.0.self_attn.qkv_proj.weight"]
    names = [f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(qkv, torch.cat([sd[n] for n in names]))
    assert torch.equal(fused["model.layers.0.mlp.gate_up_proj.weight"],
                       torch.cat([sd["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]]))
    with pytest.raises(ValueError, match="^target_modules"):
        model.add_lora(2, 4, ["q_proj", "not_a_proj"])


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"), reason="no oneDNN linear in this torch")
def test_every_row_count_does_not_grow_memory_per_row_count(monkeypatch):
    """Regression (the soak's RSS bound): oneDNN caches a JIT primitive per input shape, so one
    projection fed every row count 1..1024 grew RSS by 537 MB (measured); bucketed, well under 120."""
    import psutil

    monkeypatch.setenv("IDLM_CPU_GEMM", "onednn")
    lin = LoRALinear(576, [("up", 1536)])
    x = torch.randn(1024, 576)
    with torch.inference_mode():
        lin(x[:1])
        before = psutil.Process().memory_info().rss
        for m in range(1, 1025):
            lin(x[:m])
        grown = (psutil.Process().memory_info().rss - before) / 2**20
    assert grown < 120, f"RSS +{grown:.0f} MB over 1024 row counts"
