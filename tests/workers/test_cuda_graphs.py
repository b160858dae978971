"""CUDA graphs of the decode step (`-m gpu`; skipped without CUDA): a replay equals the same padded
step run eagerly, graphs are captured once per shape and reused, and the engine's greedy output is
the same with graphs, without them (`enforce_eager`) and by full recomputation on the CPU.

The padding and bucket logic itself runs on the CPU in tests/workers/test_kernel_path.py (the same
padded steps, replayed eagerly from the static buffer)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import naive_greedy, random_prompts, tiny_loaded
from tests.workers.test_kernel_path import _decode_items
from workers.model_runner import ModelRunner

pytestmark = pytest.mark.gpu


def _cuda(family, dtype=torch.float32, lora_rank=0):
    loaded = tiny_loaded(family, vocab_size=96, lora_rank=lora_rank)
    loaded.model.to("cuda", dtype)
    return loaded


def _runner(loaded, dtype, lora, capture):
    r = ModelRunner(loaded.model, loaded.config, 3 * 40 + 2, 16, loaded.mask_token_id, use_lora_gate=lora,
                    device="cuda", dtype=dtype, max_num_seqs=48)
    if not capture:
        r.enable_graphs(capture=False)
    g = torch.Generator(device="cuda").manual_seed(5)
    for k, v in r.kv_caches:
        k.copy_(torch.randn(k.shape, generator=g, device="cuda"))
        v.copy_(torch.randn(v.shape, generator=g, device="cuda"))
    return r


@pytest.mark.parametrize("family,lora,dtype", [("qwen3", False, torch.float32), ("llama", True, torch.float32),
                                               ("qwen3", False, torch.bfloat16)])
def test_gpu_replay_equals_eager(family, lora, dtype):
    loaded = _cuda(family, dtype, lora_rank=4 if lora else 0)
    graph, eager = _runner(loaded, dtype, lora, True), _runner(loaded, dtype, lora, False)
    assert graph.graphs is not None and graph.graphs.capture
    steps = [
        _decode_items(loaded.config, 5, [(3, 3), (0, 3), (1, 1)], ctx=300),  # mixed rounds: bucket 8, rows padded
        _decode_items(loaded.config, 40, [(0, 0)], ctx=40),  # AR: bucket 40
        _decode_items(loaded.config, 5, [(3, 3), (0, 3), (1, 1)], ctx=301, seed=1),  # the first shape again
    ]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for sched in steps:
        a, b = graph.execute(sched), eager.execute(sched)
        assert a.row_offsets == b.row_offsets
        torch.testing.assert_close(a.logits, b.logits, rtol=tol, atol=tol)
        assert torch.equal(a.logits.argmax(-1), b.logits.argmax(-1))
    assert graph.graphs.replays == 3 and len(graph.graphs.graphs) == 2
    assert all(g is not None for g, _ in graph.graphs.graphs.values())
    for kv_graph, kv_eager in zip(graph.kv_caches, eager.kv_caches):
        for a, b in zip(kv_graph, kv_eager):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("family,mode,stride,adaptive", [("qwen3", "isd", 4, False), ("llama", "risd", 4, True),
                                                         ("qwen3", "ar", 1, False)])
def test_gpu_engine_greedy_same_with_and_without_graphs(family, mode, stride, adaptive):
    pytest.importorskip("tokenizers")  # workers.engine's detokenizer
    from workers import LLM, SamplingParams

    rank = 4 if mode == "risd" else 0
    cpu = tiny_loaded(family, vocab_size=96, lora_rank=rank)
    cpu.model.has_lora = False
    prompts = random_prompts(6, 96, seed=4)
    ref = [naive_greedy(cpu.model, p, 24) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for eager in (False, True):
        loaded = _cuda(family, lora_rank=rank)
        loaded.model.has_lora = mode == "risd"
        llm = LLM(loaded=loaded, mode=mode, stride=stride, adaptive_stride=adaptive, device="cuda",
                  enforce_eager=eager, max_num_seqs=8)
        outs[eager] = [o.token_ids for o in llm.generate(prompts, params)]
        runner = llm.engine.runner
        assert (runner.graphs is None) == eager
        if not eager:
            assert runner.graphs.replays > 0
    assert outs[False] == outs[True] == ref
