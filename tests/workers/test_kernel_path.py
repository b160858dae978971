"""The engine's Triton attention path (`IDLM_ATTENTION=triton`; on CPU the kernels run in the Triton
interpreter): device-side metadata, padded graph-shaped decode steps, greedy exactness end to end,
and that a step's tensor work does not grow with the batch."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.tiny import naive_greedy, random_prompts, tiny_loaded
from workers import LLM, SamplingParams
from workers.attention import AttentionMetadata
from workers.batch_layout import StepBatch
from workers.cuda_graphs import capture_buckets, graph_padding, uniform_shape
from workers.kernel_attention import KernelMetadata, StepShape, pack_step
from workers.model_runner import ModelRunner, _row_of
from workers.request import Request
from workers.scheduler import ScheduledItem, SchedulerOutput


@pytest.fixture
def triton_attention(monkeypatch):
    monkeypatch.setenv("IDLM_ATTENTION", "triton")


def test_kernel_metadata_matches_the_sdpa_metadata():
    """Same positions and slots as the SDPA path's builder on a mixed batch (prefill chunk, decode
    blocks with drafts and MASK rows, a request with nothing cached)."""
    ctx, c_real, m_real = [0, 37, 16, 5], [20, 4, 1, 2], [0, 3, 3, 1]
    tables = [[7, 2], [0, 5, 9], [3, 8], [1]]
    n_clean = sum(c_real)
    batch = StepBatch(ids=list(range(n_clean + sum(m_real))), ctx=ctx, c_real=c_real, m_real=m_real, c_slot=c_real,
                      m_slot=m_real, tables=tables)
    q_lens = [c + m for c, m in zip(c_real, m_real)]
    row_of = _row_of(q_lens, c_real, n_clean)
    ref = AttentionMetadata.build(q_lens, ctx, tables, 16, row_of=row_of)
    shape = StepShape.of(batch, 3, 2, "cpu")
    meta, ids = KernelMetadata.build(pack_step(batch, 3), shape, 16)
    assert torch.equal(meta.positions, ref.positions) and torch.equal(meta.slot_mapping, ref.slot_mapping)
    assert torch.equal(meta.q_index, row_of) and torch.equal(meta.out_index[row_of], torch.arange(len(row_of)))
    assert meta.query_start_loc.tolist() == [0, 20, 27, 31, 34] and meta.seq_lens.tolist() == [20, 44, 20, 8]
    assert meta.block_tables.tolist() == [[7, 2, 0], [0, 5, 9], [3, 8, 0], [1, 0, 0]] and ids.tolist() == batch.ids


def _decode_items(cfg, n, rows_per_req, ctx=20, seed=0):
    """n decode rounds (pending + drafts + MASKs) of requests with `ctx` tokens cached, in blocks of
    16 laid out per request; strides per request from `rows_per_req` [(drafts, masks), ...]."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-(ctx + 8) // 16)  # blocks per request
    items = []
    for i in range(n):
        k, m = rows_per_req[i % len(rows_per_req)]
        toks = torch.randint(0, cfg.vocab_size - 1, (ctx + 1 + k,), generator=g).tolist()
        r = Request(str(i), toks[: ctx + 1], SamplingParams(), rng_key=i)
        r.num_computed, r.drafts = ctx, toks[ctx + 1 :]
        r.block_table = list(range(nb * i, nb * (i + 1)))
        items.append(ScheduledItem(r, num_real=1, num_drafts=k, num_masks=m, final=True, stride=k + 1))
    return SchedulerOutput(items=items)


def _runner(loaded, num_seqs=8, lora=False):
    g = torch.Generator().manual_seed(5)
    runner = ModelRunner(loaded.model, loaded.config, 3 * num_seqs + 2, 16, loaded.mask_token_id, use_lora_gate=lora,
                         max_num_seqs=num_seqs)
    for k, v in runner.kv_caches:  # a random cached prefix
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    return runner


@pytest.mark.parametrize("family,lora", [("qwen3", False), ("llama", True)])
def test_padded_decode_step_equals_eager_step(triton_attention, family, lora):
    """The CUDA-graph layout (every request padded to the step's most clean and MASK rows, dummy
    requests up to the bucket) run eagerly from the static buffer: same logits and KV as the
    unpadded step; padding writes nothing."""
    loaded = tiny_loaded(family, vocab_size=64, lora_rank=4 if lora else 0)
    sched = _decode_items(loaded.config, 5, [(3, 3), (0, 3), (1, 1), (3, 2), (0, 0)])
    eager = _runner(loaded, lora=lora)
    padded = _runner(loaded, lora=lora)
    padded.enable_graphs(capture=False)
    before = [t.clone() for kv in padded.kv_caches for t in kv]
    a, b = eager.execute(sched), padded.execute(sched)
    assert padded.graphs.replays == 1 and len(padded.graphs.graphs) == 1
    (shape,) = padded.graphs.graphs
    assert (shape.num_requests, shape.num_rows) == (8, 8 * 7)  # bucket 8, 4 clean + 3 MASK rows each
    assert a.row_offsets == b.row_offsets
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    written = torch.tensor([r.block_table[1] * 16 + 4 + j for it in sched.items for r in [it.request]
                            for j in range(it.num_rows)])  # positions 20.. of each request: block 1, offset 4..
    for (ka, va), (kb, vb), old in zip(eager.kv_caches, padded.kv_caches, zip(before[::2], before[1::2])):
        torch.testing.assert_close(kb, ka, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-5)
        untouched = torch.ones(kb.shape[0], dtype=torch.bool)
        untouched[written] = False
        assert torch.equal(kb[untouched], old[0][untouched]) and torch.equal(vb[untouched], old[1][untouched])


def test_enforce_eager_config_and_graph_path_errors(triton_attention):
    from workers.config import EngineConfig

    with pytest.raises(ValueError, match="^enforce_eager: "):
        EngineConfig(enforce_eager="no")
    loaded = tiny_loaded("qwen3", vocab_size=64)
    runner = _runner(loaded)
    assert runner.graphs is None  # CPU: never captured by default
    os_env = pytest.MonkeyPatch()
    os_env.setenv("IDLM_ATTENTION", "torch")
    sdpa = _runner(loaded)
    os_env.undo()
    with pytest.raises(ValueError, match="^enable_graphs: "):
        sdpa.enable_graphs(capture=False)


def test_graph_padding_rules():
    assert capture_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_buckets(5) == [1, 2, 4, 5] and capture_buckets(100)[-3:] == [80, 96, 100]
    loaded = tiny_loaded("qwen3", vocab_size=64)
    sched = _decode_items(loaded.config, 3, [(3, 3), (0, 3)])
    assert uniform_shape(sched.items) == (4, 3)
    assert graph_padding(sched.items, sched.num_tokens, capture_buckets(8)) == (4, 4, 3)
    assert graph_padding(sched.items, sched.num_tokens, capture_buckets(2)) is None  # more requests than buckets
    ar = _decode_items(loaded.config, 9, [(0, 0)])
    assert graph_padding(ar.items, ar.num_tokens, capture_buckets(64)) == (16, 1, 0)
    sched.items[1].num_real = 5  # a prefill chunk in the step: eager
    assert uniform_shape(sched.items) is None
    lopsided = _decode_items(loaded.config, 33, [(3, 3)] + [(0, 0)] * 32)  # padding would quadruple the rows
    assert graph_padding(lopsided.items, lopsided.num_tokens, capture_buckets(64)) is None


class _CountOps(TorchFunctionMode):
    """Counts torch calls (functions and tensor methods); `factories`: the tensor constructors."""

    FACTORIES = {"tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange", "empty_like", "zeros_like",
                 "ones_like", "full_like", "new_empty", "new_zeros", "new_full", "new_tensor", "randn"}

    def __init__(self):
        super().__init__()
        self.calls = self.factories = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.factories += getattr(func, "__name__", "") in self.FACTORIES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["sdpa", "kernel", "padded"])
def test_tensor_work_per_step_does_not_grow_with_the_batch(monkeypatch, path):
    """Acceptance: the metadata of 64 requests is built without per-request tensor ops: a whole
    `ModelRunner.execute` (inputs, metadata, forward, logits) makes exactly as many torch calls and
    tensor constructions at 64 requests as at 4."""
    if path != "sdpa":
        monkeypatch.setenv("IDLM_ATTENTION", "triton")
    # F.linear: oneDNN's products pad a row count to its bucket (a few ops per projection, per
    # step, whatever the request count), which would make the counts differ by row count alone
    monkeypatch.setenv("IDLM_CPU_GEMM", "torch")
    loaded = tiny_loaded("qwen3", vocab_size=64, num_layers=1)
    counts = []
    for n in (4, 64):
        runner = ModelRunner(loaded.model, loaded.config, 3 * n, 16, loaded.mask_token_id, use_lora_gate=False,
                             max_num_seqs=64, max_model_len=128)  # short: no split-KV (slow in the interpreter)
        if path == "padded":
            runner.enable_graphs(capture=False)
        sched = _decode_items(loaded.config, n, [(3, 3), (0, 3), (1, 1)])  # mixed strides and rounds
        runner.execute(sched)  # warm-up (lazy caches)
        with _CountOps() as c:
            runner.execute(sched)
        counts.append((c.calls, c.factories))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("family,mode,stride,graphs", [
    ("qwen3", "isd", 4, False), ("llama", "risd", 4, False), ("qwen3", "isd", 3, True), ("llama", "risd", 4, True),
])
def test_greedy_isd_equals_ar_with_triton_attention(triton_attention, family, mode, stride, graphs):
    """Greedy ISD / R-ISD on the kernel path equals greedy AR by full recomputation (fp32), with
    eager steps and with padded graph-shaped decode steps (replayed eagerly on CPU)."""
    loaded = tiny_loaded(family, vocab_size=96, lora_rank=4 if mode == "risd" else 0)
    loaded.model.has_lora = False
    prompts = random_prompts(4, 96, seed=4)
    ref = [naive_greedy(loaded.model, p, 12) for p in prompts]
    loaded.model.has_lora = mode == "risd"
    llm = LLM(loaded=loaded, mode=mode, stride=stride, adaptive_stride=False)
    runner = llm.engine.runner
    assert runner.kernel_path
    if graphs:
        runner.enable_graphs(capture=False)
    out = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]
    assert out == ref
    assert llm.stats().draft_tokens > 0
    if graphs:
        assert runner.graphs.replays > 0
