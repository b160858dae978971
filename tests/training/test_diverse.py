"""The far evaluation split and the diverse training set's generators: independence of every
training source from the far split, determinism, and the resumable builder end to end."""

import json
import random
from pathlib import Path

from training import generators as g
from training import prompts as P
from training.far_prompts import FAR_PROMPTS

DATA = Path(__file__).parents[2] / "training" / "data" / "smollm2"


def _generated(seed: int) -> list[str]:
    rng = random.Random(seed)
    return (g.arithmetic(rng, 500) + g.word_problems(rng, 500) + g.code_tasks(rng, 1500)
            + g.list_advice_fact_tasks(rng, 1500) + g.request_writer_prompts(rng, 500)
            + g.paragraph_writer_prompts(rng, 200) + g.followups(rng, 50))


def test_far_split_shares_no_six_word_sequence_with_any_training_source():
    assert len(FAR_PROMPTS) == len(set(FAR_PROMPTS)) >= 60
    grids = P.all_prompts() + P.train_only_prompts() + P.wide_train_prompts() + P.wider_train_prompts()
    for src in (grids, _generated(0), _generated(1)):
        assert not [p for p in src if g.far_overlap(p)]
    # the test has power: a far prompt, or one embedded in a request, is caught
    assert g.far_overlap(FAR_PROMPTS[3]) and g.far_overlap("Please help: " + FAR_PROMPTS[20])
    # categories the far split must cover: code and arithmetic among them
    assert any("Python" in p for p in FAR_PROMPTS) and any("SQL" in p for p in FAR_PROMPTS)
    assert sum(any(c.isdigit() for c in p) for p in FAR_PROMPTS) >= 10


def test_committed_far_split_holds_these_prompts_with_ar_responses():
    rows = [json.loads(x) for x in open(DATA / "far.jsonl")]
    assert [r["prompt"] for r in rows] == list(FAR_PROMPTS)
    assert all(r["response_ids"] and r["prompt_ids"] for r in rows)


def test_generators_are_deterministic_clean_and_varied():
    assert _generated(7) == _generated(7) and _generated(7) != _generated(8)
    nouns = g.word_list("noun")
    assert len(nouns) > 5000 and not set(w.lower() for w in nouns) & set(
        (Path(g.resources.files("wonderwords")) / "assets" / "profanitylist.txt").read_text().split())
    rng = random.Random(0)
    code = g.code_tasks(rng, 300)
    assert len({p.split(" function")[0] for p in code}) > 5 and len(set(code)) > 200
    assert g.parse_request('Question: "How do I keep my basil plant alive indoors?"\nSure!') == \
        "How do I keep my basil plant alive indoors?"
    assert g.parse_request("Sure.") is None and g.parse_request("") is None
    assert g.sentences(["The cat sat on the warm mat today. Short. It purred loudly at the dog all day long!"]) == [
        "The cat sat on the warm mat today.", "It purred loudly at the dog all day long!"]


def test_task_prompts_drop_far_overlaps_and_duplicates():
    from training.diverse import task_prompts

    reqs = ["How do I make my tomato plants grow taller this summer?", FAR_PROMPTS[0], FAR_PROMPTS[0]]
    paras = ["Lighthouses guide ships at night with bright lamps. Keepers once lived in them all year. "
             "Today most lighthouses run on their own with electric lights and sensors that switch on at dusk."]
    out = task_prompts(0, reqs, paras, scale=0.01)
    prompts = [p for p, _ in out]
    assert FAR_PROMPTS[0] not in prompts and reqs[0] in prompts
    assert len(prompts) == len(set(prompts))
    assert {s for _, s in out} >= {"model_request", "arithmetic", "code", "summarise", "translate"}
    assert out == task_prompts(0, reqs, paras, scale=0.01)


def test_diverse_builder_end_to_end_and_resumable(tmp_path, tiny_llama_dir):
    from training import diverse

    args = ["--model", tiny_llama_dir, "--out", str(tmp_path), "--requests", "6", "--paragraphs", "3",
            "--scale", "0.004", "--multiturn", "2", "--max-tokens", "6", "--batch", "8", "--threads", "1"]
    diverse.main(args)
    rows = [json.loads(x) for x in open(tmp_path / "train.jsonl")]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["n_train"] == len(rows) > 0 and meta["material_rows"] == 9
    assert {r["source"] for r in rows} >= {"arithmetic", "code", "multiturn"}
    assert all(r["prompt_ids"] and isinstance(r["response_ids"], list) for r in rows)
    two_turn = next(r for r in rows if r["source"] == "multiturn")
    first, follow = json.loads(two_turn["prompt"])
    assert follow in g._FOLLOWUPS and any(r["prompt"] == first for r in rows)
    diverse.main(args)  # resumed: everything is done, nothing is generated twice
    again = [json.loads(x) for x in open(tmp_path / "train.jsonl")]
    assert again == rows and len((tmp_path / "material.jsonl").read_text().splitlines()) == 9


def test_bf16_base_keeps_the_loss_and_gradients_within_tolerance():
    """`train --base-dtype bfloat16`: the frozen base in bf16 under autocast, LoRA weights fp32; the
    loss and the LoRA gradients stay close to the fp32 objective's on the same batch."""
    import copy

    import torch

    from tests.tiny import random_prompts, tiny_loaded
    from training import gated_lora, prefix_cached

    lm = tiny_loaded("qwen3", vocab_size=64, std=0.05)
    m32 = lm.model
    gated_lora.prepare_model(m32, rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in m32.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    p32, p16 = gated_lora.lora_params(m32), gated_lora.lora_params(m16)
    for a, b in zip(p32, p16):
        b.data = a.data.clone()  # the same fp32 master LoRA weights
    seqs = random_prompts(2, 63, lo=20, hi=30, seed=3)
    cuts = [[4, 9, 15], [5, 12]]
    out = {}
    for name, model, params in (("fp32", m32, p32), ("bf16", m16, p16)):
        kvs = [prefix_cached.unstack(s, 3, e, model.lm_head.weight.dtype)
               for s, e in zip(seqs, prefix_cached.real_kv_batch(model, seqs))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            loss, _ = prefix_cached.mask_rows_loss_batch(model, kvs, cuts, 3, lm.mask_token_id, distill=0.5)
        out[name] = (loss.detach(), torch.autograd.grad(loss, params))
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert all(g.dtype == torch.float32 for g in g16)
    assert abs(l16.item() - l32.item()) / l32.item() < 0.02, (l16, l32)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g16]),
                                                torch.cat([g.flatten() for g in g32]), dim=0)
    assert cos > 0.98, cos
