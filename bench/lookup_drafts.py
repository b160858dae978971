"""Would prompt-lookup (n-gram) drafts raise R-ISD's acceptance? An offline count on greedy AR text.

At every position t of each AR answer, the longest suffix of prompt + answer[:t] (n = 4 down to
`nmin` tokens) that occurred earlier proposes the k tokens that followed its latest occurrence; the
count is how often such a match exists and how many of its tokens the AR answer goes on with. The
MASK drafts' figure beside it is the demo adapter's per-position acceptance on the far split (the
`training.eval_tpf` run quoted in docs/benchmarks.md item 15). Texts: the far split's stored AR
references (72 prompts x 96 tokens) and, with `--bench`, our AR engine's greedy answers to the 16
prompts of `bench/engine.py` (128 tokens, fp32).

With `--engine`, the same lookup runs inside the R-ISD engine (fp32, fixed N = 4, the far split,
greedy, 8 at a time) through the `Drafter` hook: a pass with the MASK drafts (logging, in every
round where a lookup match exists, how many tokens each of the two draft sequences would have had
accepted, from the final text) and a pass where a match's tokens replace the MASK drafts.

    .venv/bin/python bench/lookup_drafts.py --bench --engine

A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

FAR = ROOT / "training" / "data" / "smollm2" / "far.jsonl"
MASK_ACCEPT = [0.505, 0.251, 0.120]  # far split, N = 4, cumulative per draft position


def lookup(ctx: list[int], k: int, nmin: int, nmax: int = 4) -> list[int]:
    """The k tokens after the latest earlier occurrence of ctx's longest suffix of nmax..nmin tokens."""
    t = len(ctx)
    for n in range(nmax, nmin - 1, -1):
        suf = ctx[t - n:]
        for s in range(t - n - 1, -1, -1):
            if ctx[s : s + n] == suf:
                return ctx[s + n : s + n + k]
    return []


def count(texts: list[tuple[list[int], list[int]]], nmin: int, k: int) -> dict:
    positions = matched = accepted = any_ok = 0
    for prompt, answer in texts:
        seq = prompt + answer
        for t in range(len(prompt), len(seq)):
            positions += 1
            draft = lookup(seq[:t], k, nmin)
            if not draft:
                continue
            matched += 1
            a = 0
            while a < len(draft) and t + a < len(seq) and seq[t + a] == draft[a]:
                a += 1
            accepted += a
            any_ok += a > 0
    return {"nmin": nmin, "k": k, "match_rate": round(matched / positions, 3),
            "accepted_per_match": round(accepted / max(matched, 1), 3),
            "p_first_ok_given_match": round(any_ok / max(matched, 1), 3)}


def bench_texts() -> list[tuple[list[int], list[int]]]:
    from bench.engine import prompts_for
    from workers import LLM, SamplingParams
    llm = LLM("smollm2", mode="ar", max_num_seqs=16, kv_cache_tokens=16 * 400)
    prompts = prompts_for(llm.tokenizer, 16)
    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
    return [(p, r.token_ids) for p, r in zip(prompts, res)]


def _accepted(draft: list[int], truth: list[int], i: int) -> int:
    a = 0
    while a < len(draft) and i + a < len(truth) and draft[a] == truth[i + a]:
        a += 1
    return a


def _engine_pass(loaded, rows: list[dict], replace: bool, nmin: int) -> dict:
    from workers import LLM, SamplingParams
    truth = {tuple(r["prompt_ids"]): r["response_ids"] for r in rows}
    round_toks: dict[int, list[int]] = {}
    log: list[tuple[list[int], int, list[int], list[int]]] = []  # (AR text, next index, lookup, MASK drafts)

    def drafter(req, drafts, next_index):
        found = lookup(req.prompt_token_ids + req.output_token_ids + round_toks[id(req)], len(drafts), nmin)
        log.append((truth[tuple(req.prompt_token_ids)], next_index, found, list(drafts)))
        return found + drafts[len(found):] if replace and found else drafts

    llm = LLM("smollm2", loaded=loaded, mode="risd", stride=4, adaptive_stride=False, drafter=drafter,
              max_num_seqs=8, kv_cache_tokens=8 * 400)
    propose = llm.engine.decoder._propose

    def stash(items, *a, **k):  # the round's committed tokens, which the hook is not given
        for it, _, _, toks, _ in items:
            round_toks[id(it.request)] = list(toks)
        return propose(items, *a, **k)

    llm.engine.decoder._propose = stash
    res = llm.generate([r["prompt_ids"] for r in rows], SamplingParams(temperature=0, max_tokens=96))
    forwards = sum(len(x.token_ids) / x.metrics.tokens_per_forward for x in res)
    out = {"tpf": round(sum(len(x.token_ids) for x in res) / forwards, 3),
           "identical_to_ar": sum(x.token_ids == truth[tuple(x.prompt_token_ids)][: len(x.token_ids)] for x in res),
           "proposing_rounds": len(log), "rounds_with_match": sum(1 for e in log if e[2])}
    hit = [(t, i, f, d) for t, i, f, d in log if f and i < len(t)]
    if not replace and hit:
        m = [_accepted(d, t, i) for t, i, _, d in hit]
        lk = [_accepted(f, t, i) for t, i, f, _ in hit]
        out["in_match_rounds"] = {"mask_accepted": round(sum(m) / len(hit), 3),
                                  "lookup_accepted": round(sum(lk) / len(hit), 3),
                                  "best_of_both": round(sum(map(max, m, lk)) / len(hit), 3)}
    return out


def engine_passes(rows: list[dict], nmin: int = 2) -> dict:
    """TPF of fixed-N = 4 R-ISD on `rows` with MASK drafts, and with lookup drafts where a match exists."""
    from workers import EngineConfig
    from workers.engine import load_engine_model
    loaded = load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=4))
    out = {"nmin": nmin}
    for key, replace in (("mask", False), ("lookup", True)):
        out[key] = _engine_pass(loaded, rows, replace, nmin)
        print(key, out[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true", help="also the bench/engine.py prompts (runs our AR engine)")
    ap.add_argument("--engine", action="store_true", help="also the lookup inside the R-ISD engine (far split)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lookup_drafts.json"))
    a = ap.parse_args()
    far = [json.loads(line) for line in FAR.read_text().splitlines()]
    sets = {"far": [(r["prompt_ids"], r["response_ids"]) for r in far]}
    if a.bench:
        sets["bench"] = bench_texts()
    out = {"mask_drafts_far_n4": {"accept_per_pos": MASK_ACCEPT, "accepted_per_round": round(sum(MASK_ACCEPT), 3)}}
    for name, texts in sets.items():
        out[name] = [count(texts, nmin, 3) for nmin in (1, 2, 3)]
        for row in out[name]:
            print(name, row)
    if a.engine:
        out["engine_far_n4"] = engine_passes(far)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
