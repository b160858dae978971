"""Batch invariance in bf16 on the CPU (DESIGN §1): a row's result does not depend on how many rows
share its step, where it sits among them or how far its keys are padded, so greedy and sampled
ISD / R-ISD in bf16 equal AR token for token and their logprobs are bitwise AR's.

Checked at each layer that could break it: the bf16 products (`INVARIANT_ROWS` pieces, the merged
[W; A] R-ISD product's clean columns), the fp32 head of a bf16 model (MKL's packed sgemm), the
attention (`invariant_attention`, against padding, query count and batch), then whole engines on
tiny Llama / Qwen3 models and on SmolLM2 with the shipped adapter."""

import pytest
import torch

from tests.tiny import random_prompts, tiny_loaded
from workers import LLM, SamplingParams
from workers.attention import invariant_attention
from workers.models.linear import INVARIANT_ROWS, LoRALinear

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="no native bf16 on this CPU")

ROW_COUNTS = (2, 3, 7, 16, INVARIANT_ROWS, INVARIANT_ROWS + 1, 64, 100)


def _rows_invariant(fn, x: torch.Tensor) -> list[int]:
    """Row counts m at which some row of fn(x[:m]) differs from fn of that row alone."""
    alone = [fn(x[i : i + 1]) for i in range(x.shape[0])]
    return [m for m in ROW_COUNTS if not all(torch.equal(fn(x[:m])[i : i + 1], alone[i]) for i in range(m))]


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (96, 64)])
def test_bf16_products_are_row_invariant(shape):
    torch.manual_seed(0)
    out, inp = shape
    lin = LoRALinear(inp, [("a", out // 3), ("b", out - out // 3)]).to(torch.bfloat16).requires_grad_(False)
    lin.add_lora(8, 2.0, init_b_zero=False)
    lin.requires_grad_(False)
    x = torch.randn(100, inp).to(torch.bfloat16)
    with torch.inference_mode():
        assert _rows_invariant(lin, x) == []
        # R-ISD: the last 3 rows take the LoRA delta; the clean rows are bitwise the 1-row base
        for m in (4, 7, 16, 40):
            y = lin(x[:m], lora_rows=slice(m - 3, m))
            assert all(torch.equal(y[i : i + 1], lin(x[i : i + 1])) for i in range(m - 3))
            assert not torch.equal(y[m - 3 :], lin(x[m - 3 : m]))


def test_fp32_head_of_a_bf16_model_is_row_invariant():
    loaded = tiny_loaded("qwen3", vocab_size=4000, seed=2)
    model = loaded.model.to(torch.bfloat16)
    h = torch.randn(100, model.config.hidden_size).to(torch.bfloat16)
    with torch.inference_mode():
        assert model.compute_logits(h[:2]).dtype == torch.float32
        assert _rows_invariant(model.compute_logits, h) == []


def _attend(q, k, v, b: int, start: int, lq: int, pad: int) -> torch.Tensor:
    """Request 0's rows (of b requests) for queries at start..start+lq-1, each seeing keys up to
    itself, keys padded by `pad`: [Hq, lq, D]."""
    lk = start + lq + pad
    last = start + torch.arange(lq)
    mask = (torch.arange(lk)[None, :] <= last[:, None])[None, None].expand(b, 1, lq, lk)
    return invariant_attention(q[:b, :, start : start + lq], k[:b, :, :lk], v[:b, :, :lk], mask, 0.125)[0]


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 2, 16), (16, 8, 128)])
def test_attention_rows_do_not_depend_on_batch_queries_or_padding(heads):
    """Every query row of a block (prefill chunks, R-ISD blocks, padded batches) equals the same
    query attended alone, as an AR decode step would."""
    torch.manual_seed(0)
    hq, hkv, d = heads
    for ctx in (0, 7, 60):
        q = torch.randn(3, hq, ctx + 110, d).to(torch.bfloat16)
        k, v = (torch.randn(3, hkv, ctx + 180, d).to(torch.bfloat16) for _ in range(2))
        alone = [_attend(q, k, v, 1, ctx + j, 1, 0)[:, 0] for j in range(100)]
        for b, lq, pad in ((1, 7, 0), (1, 37, 0), (3, 36, 1), (2, 100, 5), (3, 64, 63)):
            o = _attend(q, k, v, b, ctx, lq, pad)
            assert all(torch.equal(o[:, j], alone[j]) for j in range(lq)), (ctx, b, lq, pad)


def _bf16_tiny(family: str):
    loaded = tiny_loaded(family, lora_rank=4, seed=5)
    loaded.model.to(torch.bfloat16)
    return loaded


def _generate(loaded, mode, stride, prompts, params, **kw):
    loaded.model.has_lora = mode == "risd"
    llm = LLM(loaded=loaded, mode=mode, stride=stride, dtype="bfloat16", kv_cache_tokens=8192,
              max_num_batched_tokens=512, **kw)
    return [llm.generate(prompts, params), [llm.generate([p], params)[0] for p in prompts[:2]]], llm.stats()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_isd_and_risd_equal_ar_with_bitwise_logprobs(family):
    loaded = _bf16_tiny(family)
    prompts = random_prompts(8, loaded.config.vocab_size, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    (ref, ref1), _ = _generate(loaded, "ar", 1, prompts, greedy)
    for mode, stride, adaptive in (("isd", 4, False), ("isd", 2, False), ("risd", 4, False), ("risd", 3, True)):
        (outs, outs1), st = _generate(loaded, mode, stride, prompts, greedy, adaptive_stride=adaptive)
        for r, o in zip(ref + ref1, outs + outs1):
            assert o.token_ids == r.token_ids, (mode, stride)
            assert [(e.logprob, e.top_ids, e.top_logprobs) for e in o.logprobs] == \
                [(e.logprob, e.top_ids, e.top_logprobs) for e in r.logprobs], (mode, stride)
        if not adaptive:
            assert st.draft_tokens > 0


def test_bf16_seeded_sampling_does_not_depend_on_the_batch():
    """A seeded request samples the same tokens alone or among 7 others, in AR and in R-ISD at a fixed
    stride (ISD's sampled output is AR-distributed, not AR's sample path:
    tests/workers/test_sampling_exactness.py)."""
    loaded = _bf16_tiny("qwen3")
    prompts = random_prompts(8, loaded.config.vocab_size, seed=9)
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=24, ignore_eos=True, logprobs=2)
    for mode, stride in (("ar", 1), ("risd", 4)):  # a fixed stride: the adaptive one follows the load
        (batched, alone), _ = _generate(loaded, mode, stride, prompts, params, adaptive_stride=False)
        for b, a in zip(batched, alone):
            assert a.token_ids == b.token_ids and [e.logprob for e in a.logprobs] == [e.logprob for e in b.logprobs]


def test_smollm2_bf16_risd_equals_ar():
    """The demo model and adapter in bf16: R-ISD (fixed N=4 and adaptive) is AR token for token on
    prompts of several kinds, batched and alone (the 16-prompt, 128-token run: bench/bf16_agreement.py)."""
    from workers import EngineConfig
    from workers.engine import load_engine_model

    loaded = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=4, dtype="bfloat16"))
    ar = LLM("smollm2", loaded=loaded, mode="ar", dtype="bfloat16")
    qs = ["List three uses of copper.", "Write a haiku about autumn leaves.", "What is 17 times 23?",
          "Make a packing list for a weekend hike."]
    ids = [ar.encode_chat([{"role": "user", "content": q}]) for q in qs]
    sp = SamplingParams(temperature=0, max_tokens=40, logprobs=1)
    ref = ar.generate(ids, sp)
    for adaptive in (False, True):
        llm = LLM("smollm2", loaded=loaded, mode="risd", stride=4, dtype="bfloat16", adaptive_stride=adaptive)
        outs = llm.generate(ids, sp) + [llm.generate([ids[0]], sp)[0]]
        for r, o in zip(ref + ref[:1], outs):
            assert o.token_ids == r.token_ids
            assert [e.logprob for e in o.logprobs] == [e.logprob for e in r.logprobs]
        if not adaptive:
            assert llm.stats().tokens_per_forward > 1.1


def test_startup_probe_passes_here_and_catches_a_batch_dependent_kernel():
    """`invariance_failures` finds nothing on the engine's bf16 kernels (the engine records it), and
    the probe flags kernels whose rows depend on the batch: fp32 `F.linear` (MKL's sgemm) and a
    bf16 product of more than INVARIANT_ROWS rows in one piece."""
    import torch.nn.functional as F

    from workers.batch_invariance import invariance_failures, rows_independent

    loaded = _bf16_tiny("qwen3")
    assert invariance_failures(loaded.model) == []
    llm = LLM(loaded=loaded, mode="ar", dtype="bfloat16", kv_cache_tokens=1024)
    assert llm.engine.batch_invariant is True
    w = torch.randn(1000, 576)
    assert not rows_independent(lambda x: F.linear(x, w), 576, torch.float32)
    assert not rows_independent(lambda x: F.linear(x, w.bfloat16()), 576, torch.bfloat16)  # at 33 rows
    assert rows_independent(lambda x: F.linear(x, w.bfloat16()), 576, torch.bfloat16, rows=(2, 7, 32))
