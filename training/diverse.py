"""Builder of the diverse training set: independent generators -> greedy AR responses of the base model.

    python -m training.diverse --out runs/data-diverse --threads 2            # resumable: rerun to continue
    python -m training.diverse --out runs/data-diverse --requests 200 --scale 0.1   # a small set

Stages, each appended to its own file in OUT and skipped where already done (incremental and
resumable; rows are flushed as they are written):
1. `material.jsonl`: text the base model writes from random seed words (`training.generators`):
   user requests (sampled, T=0.8, one seed per row) and short paragraphs;
2. `train.jsonl`: prompts from every generator (model-written requests, arithmetic, word problems,
   code in several languages, rewriting / translation of the model's sentences, summarising its
   paragraphs, lists / advice / facts), each answered by the base model, greedy (our engine, AR);
3. `train.jsonl` (continued): two-turn chats, a follow-up after a stage-2 exchange.
Any prompt that shares a 6-word sequence with the far evaluation split is dropped
(`generators.far_overlap`). Rows have the `training.data` layout (prompt, prompt_ids,
response_ids, text) plus `source` (the generator); `meta.json` counts rows per source.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from training import generators as g


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _generate(llm, items: list[tuple[str, list[dict], str]], params, out, batch: int, rows: list[dict]) -> int:
    """Answers `items` (prompt, messages, source) in batches, appending rows to `out`; returns tokens."""
    ntok = 0
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        ids = [llm.encode_chat(m) for _, m, _ in chunk]
        res = llm.generate(ids, params)
        for (p, _, src), pid, r in zip(chunk, ids, res):
            row = {"prompt": p, "prompt_ids": pid, "response_ids": list(r.token_ids), "text": r.text, "source": src}
            out.write(json.dumps(row) + "\n")
            rows.append(row)
            ntok += len(r.token_ids)
        out.flush()
        print(f"  {len(rows)} rows, last source {chunk[-1][2]}", flush=True)
    return ntok


def task_prompts(seed: int, requests: list[str], paragraphs: list[str], scale: float) -> list[tuple[str, str]]:
    """(prompt, source) from every generator, deterministic in `seed`, far-overlapping ones dropped."""
    rng = random.Random(seed)
    sents = g.sentences(paragraphs)
    k = lambda n: max(1, int(n * scale))  # noqa: E731
    out = [(p, "model_request") for p in requests]
    out += [(p, "arithmetic") for p in g.arithmetic(rng, k(500))]
    out += [(p, "word_problem") for p in g.word_problems(rng, k(500))]
    out += [(p, "code") for p in g.code_tasks(rng, k(900))]
    out += [(p, "rewrite") for p in g.rewrite_tasks(rng, sents, k(500))]
    out += [(p, "translate") for p in g.translate_tasks(rng, sents, k(500))]
    out += [(p, "summarise") for p in g.summarise_tasks(rng, paragraphs, k(500))]
    out += [(p, "list_advice_fact") for p in g.list_advice_fact_tasks(rng, k(1200))]
    seen, keep = set(), []
    for p, src in out:
        if p not in seen and not g.far_overlap(p):
            seen.add(p)
            keep.append((p, src))
    random.Random(seed + 1).shuffle(keep)
    return keep


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="runs/data-diverse")
    ap.add_argument("--requests", type=int, default=3000, help="model-written requests to sample")
    ap.add_argument("--paragraphs", type=int, default=700, help="model-written paragraphs to sample")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the task generators' counts")
    ap.add_argument("--multiturn", type=int, default=700, help="two-turn chats")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32",
                    help="engine dtype; bfloat16 is ~2x faster on CPUs with native bf16, and its greedy "
                         "responses leave fp32's only at near-ties (labels stay the base model's; the "
                         "trainer's teacher_agree statistic measures it)")
    a = ap.parse_args(argv)
    import torch

    from workers import LLM, SamplingParams

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(a.model, mode="ar", max_num_seqs=a.batch, device=a.device, dtype=a.dtype, adaptive_stride=False,
              kv_cache_tokens=a.batch * (a.max_tokens + 400), max_num_batched_tokens=max(2048, a.batch * 64))
    t0, ntok = time.time(), 0
    # 1. material (sampled: one seed per row, so a resumed run continues the same sequence)
    mat_path = out / "material.jsonl"
    material = _read(mat_path)
    rng = random.Random(a.seed)
    metas = [("request", m) for m in g.request_writer_prompts(rng, a.requests)]
    metas += [("paragraph", m) for m in g.paragraph_writer_prompts(rng, a.paragraphs)]
    todo = metas[len(material) :]
    with open(mat_path, "a") as f:
        for i in range(0, len(todo), a.batch):
            chunk = todo[i : i + a.batch]
            base = len(material)
            ps = [SamplingParams(temperature=0.8, top_p=0.95, seed=a.seed * 10**6 + base + j,
                                 max_tokens=60 if kind == "request" else 160) for j, (kind, _) in enumerate(chunk)]
            res = llm.generate([llm.encode_chat([{"role": "user", "content": m}]) for _, m in chunk], ps)
            for (kind, m), r in zip(chunk, res):
                row = {"kind": kind, "meta": m, "text": r.text}
                f.write(json.dumps(row) + "\n")
                material.append(row)
                ntok += len(r.token_ids)
            f.flush()
            print(f"material {len(material)}/{len(metas)}", flush=True)
    requests = [q for r in material if r["kind"] == "request" and (q := g.parse_request(r["text"]))]
    paragraphs = [r["text"].strip() for r in material if r["kind"] == "paragraph"]
    # 2. single-turn prompts from every generator, greedy responses
    train_path = out / "train.jsonl"
    rows = _read(train_path)
    done = {r["prompt"] for r in rows}
    items = [(p, [{"role": "user", "content": p}], src) for p, src in task_prompts(a.seed, requests, paragraphs, a.scale)
             if p not in done]
    greedy = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    with open(train_path, "a") as f:
        ntok += _generate(llm, items, greedy, f, a.batch, rows)
        # 3. two-turn chats: a follow-up after an exchange of stage 2
        rng = random.Random(a.seed + 2)
        firsts = [r for r in rows if r.get("source") != "multiturn" and r["text"].strip()]
        picks = rng.sample(firsts, min(a.multiturn, len(firsts)))
        items = []
        for r, fu in zip(picks, g.followups(rng, len(picks))):
            key = json.dumps([r["prompt"], fu])
            if key not in done:
                msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["text"]},
                        {"role": "user", "content": fu}]
                items.append((key, msgs, "multiturn"))
        ntok += _generate(llm, items, greedy, f, a.batch, rows)
    sources: dict[str, int] = {}
    for r in rows:
        sources[r.get("source", "?")] = sources.get(r.get("source", "?"), 0) + 1
    prev = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    meta = {"model": a.model, "n_train": len(rows), "sources": sources, "material_rows": len(material),
            "requests_parsed": len(requests), "paragraphs": len(paragraphs), "max_tokens": a.max_tokens,
            "gen_seconds": round(prev.get("gen_seconds", 0) + time.time() - t0, 1),
            "gen_tokens": prev.get("gen_tokens", 0) + ntok, "seed": a.seed, "dtype": a.dtype,
            "response_tokens": sum(len(r["response_ids"]) for r in rows)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
