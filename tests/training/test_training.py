"""Training objectives: masks vs hand-written matrices, loss falls on tiny models, adapter in engine."""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny import naive_greedy, random_prompts, tiny_loaded
from training import gated_lora, idlm_objective

torch.set_num_threads(1)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_block_mask_b1():
    # L=3, B=1: x_t sees only itself; x_t sees x_0 strictly earlier positions; x_0 causal
    exp = _m([
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ])
    assert torch.equal(idlm_objective.block_diff_mask(3, 1), exp)


def test_block_mask_b2():
    exp = _m([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ])
    assert torch.equal(idlm_objective.block_diff_mask(4, 2), exp)


def test_block_mask_b3():
    exp = _m([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ])
    assert torch.equal(idlm_objective.block_diff_mask(4, 3), exp)


def test_gated_pack_mask():
    # seq of 5 real tokens, prompt 2, cuts at t=1 and t=2, group 2
    ids, pos, mask, lora, labels = gated_lora.pack_example([10, 11, 12, 13, 14], 2, [1, 2], 2, 99)
    assert ids.tolist() == [10, 11, 12, 13, 14, 99, 99, 99, 99]
    assert pos.tolist() == [0, 1, 2, 3, 4, 2, 3, 3, 4]
    exp = _m([
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(mask, exp)
    assert lora.tolist() == [0] * 5 + [1] * 4
    # MASK j after cut t predicts x_{t+2+j}
    assert labels.tolist() == [-100] * 5 + [13, 14, 14, -100]


def _data(vocab, n=8, seed=0):
    # a few fixed sequences repeated, so that the continuation is learnable in a few steps
    g = random.Random(seed)
    base = [[g.randrange(vocab - 1) for _ in range(24)] for _ in range(2)]
    return [(base[i % 2], 4) for i in range(n)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gated_lora_loss_falls(family):
    lm = tiny_loaded(family, vocab_size=64)
    model = lm.model
    with torch.no_grad():  # unit norm weights: the random N(0, std) norms would squash the LoRA delta
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    params = gated_lora.prepare_model(model, rank=16, alpha=32)
    opt = torch.optim.AdamW(params, lr=1e-2)
    rows, rng = _data(64), random.Random(0)
    losses = []
    for _ in range(30):
        batch = gated_lora.collate(rows, 3, lm.mask_token_id, 4, rng)
        loss, _ = gated_lora.loss_fn(model, batch, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_idlm_loss_falls(family):
    lm = tiny_loaded(family, vocab_size=64, std=0.05)
    model = lm.model
    params = idlm_objective.prepare_model(model)
    opt = torch.optim.AdamW(params, lr=3e-3)
    rows = _data(64, n=4)
    losses = []
    for _ in range(30):
        batch = idlm_objective.collate(rows, 3, lm.mask_token_id)
        loss, st = idlm_objective.loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(st["task"] + st["clean"])
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_adapter_roundtrip_lossless(tmp_path):
    from workers import LLM, SamplingParams
    from workers.loader import load_adapter, save_adapter

    lm = tiny_loaded("llama", vocab_size=64)
    params = gated_lora.prepare_model(lm.model, rank=4, alpha=8)
    opt = torch.optim.AdamW(params, lr=1e-2)
    rng = random.Random(0)
    for _ in range(3):
        loss, _ = gated_lora.loss_fn(lm.model, gated_lora.collate(_data(64), 3, lm.mask_token_id, 4, rng), 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(lm.model, tmp_path / "a", lm.mask_token_id, stride=4)
    fresh = tiny_loaded("llama", vocab_size=64)
    info = load_adapter(fresh.model, tmp_path / "a")
    assert info.mask_token_id == lm.mask_token_id and info.stride == 4
    prompts = random_prompts(3, 64, seed=3)
    base = tiny_loaded("llama", vocab_size=64)
    ref = [naive_greedy(base.model, p, 12) for p in prompts]
    llm = LLM(loaded=fresh, mode="risd", stride=4)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in out] == ref


def _lora_model(family: str):
    """A tiny model with a rank-4 gated LoRA whose B is non-zero (so LoRA gradients are non-trivial)."""
    lm = tiny_loaded(family, vocab_size=64)
    params = gated_lora.prepare_model(lm.model, rank=4, alpha=8)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return lm, lm.model, params


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefix_cached_loss_equals_packed_dense(family):
    """The fast path (real rows once, no grad; MASK rows only) is the same objective as the packed
    dense one: equal loss and equal LoRA gradients on a model with non-zero LoRA B."""
    from training import prefix_cached

    lm, model, params = _lora_model(family)
    seq, plen = random_prompts(1, 64, lo=20, hi=21, seed=5)[0], 5
    cuts = [4, 7, 8, 15]
    ids, pos, mask, lora, labels = gated_lora.pack_example(seq, plen, cuts, 3, lm.mask_token_id)
    ref, _ = gated_lora.loss_fn(model, (ids[None], pos[None], mask[None], lora[None], labels[None]), 3)
    ref_grads = torch.autograd.grad(ref, params)
    fast, _ = prefix_cached.mask_rows_loss(model, prefix_cached.real_kv(model, seq, plen), cuts, 3, lm.mask_token_id)
    grads = torch.autograd.grad(fast, params)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_prefix_cached_batch_equals_mean_of_sequences():
    """The batched fast path (one forward, block-diagonal over sequences of different lengths) gives
    the mean of the per-sequence losses and the same LoRA gradients; a cut-less sequence is skipped."""
    from training import prefix_cached

    lm, model, params = _lora_model("qwen3")
    a, b = random_prompts(2, 64, lo=14, hi=26, seed=9)
    kva, kvb = prefix_cached.real_kv(model, a, 4), prefix_cached.real_kv(model, b, 6)
    ca, cb = [3, 6, len(a) - 3], [5, 9]
    la, _ = prefix_cached.mask_rows_loss(model, kva, ca, 3, lm.mask_token_id)
    lb, _ = prefix_cached.mask_rows_loss(model, kvb, cb, 3, lm.mask_token_id)
    ref = (la + lb) / 2
    ref_grads = torch.autograd.grad(ref, params)
    got, stats = prefix_cached.mask_rows_loss_batch(model, [kva, kvb, kva], [ca, cb, []], 3, lm.mask_token_id)
    grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert set(stats) == {"acc0", "acc1", "acc2"}
    with pytest.raises(ValueError, match="cuts"):
        prefix_cached.mask_rows_loss_batch(model, [kva], [[]], 3, lm.mask_token_id)


def test_real_kv_batch_equals_per_sequence():
    """The padded batch of real rows gives each sequence the K/V of its own unpadded forward."""
    from training import prefix_cached

    lm = tiny_loaded("llama", vocab_size=64)
    seqs = random_prompts(3, 64, lo=5, hi=30, seed=4)
    got = prefix_cached.real_kv_batch(lm.model, seqs)
    for s, kv in zip(seqs, got):
        ref = prefix_cached.real_kv(lm.model, s, 2)
        u = prefix_cached.unstack(s, 2, kv)
        assert kv[0].shape[2] == len(s) and u.hidden.shape[0] == len(s)
        for a, b in zip(u.keys + u.values + [u.hidden], ref.keys + ref.values + [ref.hidden]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_distill_loss_equals_hand_written_kl(family):
    """`distill` mixes CE with KL(p_base || q): p_base is the base model's own next-token distribution
    at the real row t+1+j (taken here from a plain causal forward of the whole sequence, with no
    LoRA anywhere), q the MASK row's (taken from the packed dense objective); decay-weighted mean."""
    from training import prefix_cached

    lm, model, params = _lora_model(family)
    seq, plen, group = random_prompts(1, 64, lo=20, hi=21, seed=6)[0], 5, 3
    cuts = [4, 9, 16]
    ids, pos, mask, lora, labels = gated_lora.pack_example(seq, plen, cuts, group, lm.mask_token_id)
    with torch.no_grad():
        L = len(seq)
        full = model(torch.tensor(seq)[None], torch.arange(L)[None],
                     dense_mask=torch.ones(L, L, dtype=torch.bool).tril()[None],
                     lora_mask=torch.zeros(1, L, dtype=torch.bool))[0]  # [L, H]
        p_log = torch.log_softmax(model.compute_logits(full).float(), -1)  # [L, V]
        h = model(ids[None], pos[None], dense_mask=mask[None], lora_mask=lora[None])[0]
    sel = labels != -100
    q_log = torch.log_softmax(model.compute_logits(h[sel]).float(), -1)
    teacher = p_log[pos[sel]]  # MASK row at position t+1+j <- real row t+1+j
    kl = (teacher.exp() * (teacher - q_log)).sum(-1)
    ce = -q_log.gather(1, labels[sel][:, None])[:, 0]
    w = 0.8 ** ((torch.arange(len(ids)) - L) % group)[sel].float()
    kv = prefix_cached.real_kv(model, seq, plen)
    for lam in (1.0, 0.3):
        got, stats = prefix_cached.mask_rows_loss(model, kv, cuts, group, lm.mask_token_id, distill=lam)
        ref = (((1 - lam) * ce + lam * kl) * w).sum() / w.sum()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert 0.0 <= stats["teacher_agree"] <= 1.0
    assert torch.autograd.grad(got, params)[0].abs().sum() > 0
    with pytest.raises(ValueError, match="distill"):
        prefix_cached.mask_rows_loss(model, kv, cuts, group, lm.mask_token_id, distill=1.5)


def test_wide_prompts_never_heldout_and_prefix_spans_topics():
    from training.prompts import (
        WIDE_TEMPLATES,
        WIDE_TOPICS,
        all_prompts,
        train_only_prompts,
        wide_train_prompts,
    )

    wide = wide_train_prompts()
    assert len(wide) == len(set(wide)) > 7000
    assert not set(wide) & set(all_prompts())  # the held-out split is drawn from all_prompts()
    assert wide[: len(train_only_prompts())] == train_only_prompts()
    # the shuffled tail: its first 1000 prompts already touch most wide topics and every template
    head = wide[len(train_only_prompts()) : len(train_only_prompts()) + 1000]
    assert sum(any(t in p for p in head) for t in WIDE_TOPICS) > 0.9 * len(WIDE_TOPICS)
    assert all(any(p == tpl.format(t=t) for p in head for t in WIDE_TOPICS) for tpl in WIDE_TEMPLATES)



def test_wider_prompts_extend_wide_and_never_heldout():
    from training.prompts import (
        WIDER_TEMPLATES,
        WIDER_TOPICS,
        all_prompts,
        wide_train_prompts,
        wider_train_prompts,
    )

    wide, wider = wide_train_prompts(), wider_train_prompts()
    assert wider[: len(wide)] == wide  # `--resume` on a --wide split generates only the new tail
    tail = wider[len(wide) :]
    assert len(wider) == len(set(wider)) and len(tail) > 3000
    assert not set(wider) & set(all_prompts())
    # every new template over an old held-out topic, every new topic over an old held-out template
    assert "Explain how the Moon works, step by step." in tail
    assert "Explain knitting in simple terms." in tail
    assert all(any(t in p for p in tail[:1000]) for t in WIDER_TOPICS[:10])
    assert all(any(p.startswith(tpl.split("{t}")[0]) for p in tail[:500]) for tpl in WIDER_TEMPLATES)


def test_novel_prompts_share_no_topic_or_template_with_training():
    from training import prompts as P

    novel = P.novel_prompts()
    assert len(novel) == len(set(novel)) == 60
    trained = set(P.all_prompts()) | set(P.wider_train_prompts())
    assert not set(novel) & trained
    topics = P.TOPICS + P.MORE_TOPICS + P.WIDE_TOPICS + P.WIDER_TOPICS
    templates = P.TEMPLATES + P.MORE_TEMPLATES + P.WIDE_TEMPLATES + P.WIDER_TEMPLATES
    # no novel topic is (or contains, or is contained in) a trained topic; no template is shared
    assert not [(n, t) for n in P.NOVEL_TOPICS for t in topics if n.lower() in t.lower() or t.lower() in n.lower()]
    assert not set(P.NOVEL_TEMPLATES) & set(templates)
    # the committed novel split holds exactly these prompts, with the engine's AR responses
    import json
    from pathlib import Path

    rows = [json.loads(x) for x in open(Path(__file__).parents[2] / "training/data/smollm2/novel.jsonl")]
    assert [r["prompt"] for r in rows] == novel and all(r["response_ids"] for r in rows)

def test_load_rows_stops_at_a_partial_last_line(tmp_path):
    import json

    from training.train import load_rows

    f = tmp_path / "train.jsonl"
    row = {"prompt": "p", "prompt_ids": [1, 2], "response_ids": [3, 4, 5], "text": "x"}
    f.write_text(json.dumps(row) + "\n" + json.dumps(row)[:20])  # the builder is mid-write
    assert load_rows(f) == [([1, 2, 3, 4, 5], 2)]


def test_train_cli_warm_start_and_kv_cache_cap(tmp_path):
    """The CLI end to end on a tiny I-DLM-shaped model directory: a run with the real-row K/V cache
    capped at 0 bytes (every entry evicted after its step) trains and saves; a second run started
    from that adapter with lr 0 saves the same weights and counts both runs' steps; a rank that
    does not match the adapter's is refused by name."""
    import json

    from safetensors.torch import load_file

    from tests.models import make_tiny_model_dir
    from training.train import main as train_main

    d = make_tiny_model_dir(tmp_path / "m", "sdar")
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for p in random_prompts(6, 300, lo=16, hi=30, seed=3):
            f.write(json.dumps({"prompt": "p", "prompt_ids": p[:4], "response_ids": p[4:], "text": ""}) + "\n")
    common = ["--model", d, "--data", str(data), "--group", "3", "--cuts", "4", "--batch", "2",
              "--rank", "4", "--alpha", "8", "--threads", "1", "--device", "cpu"]
    train_main(common + ["--steps", "3", "--kv-cache-gb", "0", "--out", str(tmp_path / "r1")])
    train_main(common + ["--steps", "2", "--lr", "0", "--init-adapter", str(tmp_path / "r1" / "adapter"),
                         "--out", str(tmp_path / "r2")])
    a = load_file(str(tmp_path / "r1" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "r2" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "r2" / "adapter" / "adapter_config.json").read_text())
    assert cfg["idlm"]["train_steps"] == 5
    with pytest.raises(ValueError, match="init-adapter: rank 4"):
        train_main(common + ["--rank", "8", "--steps", "1", "--init-adapter", str(tmp_path / "r1" / "adapter"),
                          "--out", str(tmp_path / "r3")])
    # pooled data directories, a bf16 base with fp32 LoRA, weight decay and LoRA dropout
    train_main(common[:2] + ["--data", str(data), str(data)] + common[4:]
               + ["--steps", "2", "--base-dtype", "bfloat16", "--weight-decay", "0.01", "--lora-dropout", "0.1",
                  "--out", str(tmp_path / "r4")])
    c = load_file(str(tmp_path / "r4" / "adapter" / "adapter_model.safetensors"))
    assert c.keys() == a.keys() and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in c.values())


@pytest.mark.parametrize("extra", [["--distill", "1.5"], ["--distill", "-0.1"], ["--objective", "idlm", "--distill", "0.5"]])
def test_train_cli_refuses_bad_distill_before_loading(extra, tmp_path, capsys):
    """A bad `--distill` is an argparse error naming the flag, before any model or data is read
    (the model path does not exist), and `idlm` (which has no teacher rows) refuses it too."""
    from training.train import main as train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--model", str(tmp_path / "none"), "--out", str(tmp_path / "r")] + extra)
    assert e.value.code == 2 and "--distill" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_average_adapters_mean_config_and_mismatch(tmp_path):
    """`training.average`: the written adapter is the element-wise mean of its inputs (fp16 in,
    fp16 out, accumulated in fp32), the engine's loader takes it, the config keeps the lineage's
    latest train_steps and lists all of them, and adapters of different rank or stride are refused
    by field name with nothing written."""
    import json

    from safetensors.torch import load_file

    from training.average import main as average_main
    from workers.loader import load_adapter, save_adapter

    def adapter(name, rank, stride, steps, seed):
        lm = tiny_loaded("llama", vocab_size=64)
        gated_lora.prepare_model(lm.model, rank=rank, alpha=8)
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in lm.model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.1)
        save_adapter(lm.model, tmp_path / name, lm.mask_token_id, stride=stride,
                     extra={"train_steps": steps, "group": 3}, dtype=torch.float16)
        return str(tmp_path / name)

    a, b = adapter("a", 4, 4, 10, 0), adapter("b", 4, 4, 30, 1)
    average_main([a, b, "--out", str(tmp_path / "avg")])
    wa, wb = (load_file(f"{d}/adapter_model.safetensors") for d in (a, b))
    avg = load_file(str(tmp_path / "avg" / "adapter_model.safetensors"))
    assert avg.keys() == wa.keys() and all(v.dtype == torch.float16 for v in avg.values())
    assert all(torch.equal(avg[k], ((wa[k].float() + wb[k].float()) / 2).half()) for k in wa)
    assert not all(torch.equal(avg[k], wa[k]) for k in wa)
    cfg = json.loads((tmp_path / "avg" / "adapter_config.json").read_text())
    assert cfg["idlm"]["train_steps"] == 30 and cfg["idlm"]["averaged_train_steps"] == [10, 30]
    lm = tiny_loaded("llama", vocab_size=64)
    gated_lora.prepare_model(lm.model, rank=4, alpha=8)
    assert load_adapter(lm.model, tmp_path / "avg").rank == 4
    for other, field in ((adapter("r8", 8, 4, 5, 2), "r="), (adapter("s2", 4, 2, 5, 3), "idlm.stride=")):
        with pytest.raises(ValueError, match=field):
            average_main([a, other, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="at least two"):
        average_main([a, "--out", str(tmp_path / "bad")])
