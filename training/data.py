"""Data builder: project prompts -> greedy AR responses from OUR engine (base model) -> train/held-out.

    python -m training.data --model smollm2 --out training/data/smollm2
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from tqdm import tqdm

from training.prompts import all_prompts, train_only_prompts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="training/data/smollm2")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--no-extra", action="store_true", help="train split: only the 230 base prompts")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    from workers import LLM, SamplingParams

    torch.set_num_threads(a.threads)
    prompts = all_prompts()
    random.Random(0).shuffle(prompts)  # fixed shuffle: its last --heldout prompts are held out
    heldout = prompts[len(prompts) - a.heldout :]
    train = prompts[: len(prompts) - a.heldout] + ([] if a.no_extra else train_only_prompts())
    if a.limit:
        train = train[: a.limit]
    llm = LLM(a.model, mode="ar", max_num_seqs=a.batch)
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=False)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # the held-out split first (small), then the train split batch by batch, so training can start
    # early
    files = {name: open(out / f"{name}.jsonl", "w") for name in ("train", "heldout")}
    t0, ntok, counts = time.time(), 0, {"train": 0, "heldout": 0}
    work = [("heldout", heldout[i : i + a.batch]) for i in range(0, len(heldout), a.batch)]
    work += [("train", train[i : i + a.batch]) for i in range(0, len(train), a.batch)]
    for split, chunk in tqdm(work, desc="generate"):
        ids = [llm.encode_chat([{"role": "user", "content": p}]) for p in chunk]
        res = llm.generate(ids, sp)
        for p, pid, r in zip(chunk, ids, res):
            row = {"prompt": p, "prompt_ids": pid, "response_ids": list(r.token_ids), "text": r.text}
            files[split].write(json.dumps(row) + "\n")
            counts[split] += 1
            ntok += len(r.token_ids)
        files[split].flush()
    for f in files.values():
        f.close()
    dt = time.time() - t0
    meta = {"model": a.model, "n_train": counts["train"], "n_heldout": counts["heldout"], "gen_tokens": ntok,
            "gen_seconds": round(dt, 1), "tokens_per_s": round(ntok / dt, 1), "max_tokens": a.max_tokens}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
