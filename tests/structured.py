"""Helpers of the structured-output tests: a tiny model with a small string vocabulary (so every
constrained output can be enumerated), fresh-matcher replays, and the exact constrained AR law.

The vocabulary has overlapping tokens ("a", "b", "ab", "ba", "bc": one string, several token
sequences), an EOS (id 0, the stop token), padded ids past the strings and a MASK id that is
ordinary text to the grammar (so only the engine's own rule keeps it out of the output).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from idlm_kernels import processed_probs
from tests.tiny import tiny_loaded

VOCAB = ["<eos>", "a", "b", "c", "ab", "ba", "bc", "x", "y", "z", "{", "}", "1", "2", "3", "aa"]
V = 20  # lm_head rows: ids 16..19 are padding (no string)
EOS = 0
MASK = 15  # "aa": text the grammar would allow; the engine must never emit or draft it
PROMPT = [1, 4, 2, 7]


def tiny_grammar_model(seed: int = 21, std: float = 0.25, lora_rank: int = 0):
    loaded = tiny_loaded("qwen3", vocab_size=V, seed=seed, std=std, lora_rank=lora_rank)
    loaded.config.eos_token_ids = [EOS]
    return replace(loaded, token_strings=VOCAB, mask_token_id=MASK)


def compiled(spec: dict):
    """A compiled grammar of `VOCAB` for a `StructuredOutputs` dict (the engine's own backend)."""
    from workers.grammar import GrammarBackend
    from workers.structured_params import StructuredOutputs

    b = GrammarBackend(None, V, [EOS], token_strings=VOCAB)
    return b, b._compile(StructuredOutputs(**spec))


def fresh_mask(backend, cg, tokens: list[int]) -> torch.Tensor | None:
    """Bitmask row [ceil(V/32)] int32 of a fresh matcher after `tokens` (MASK cleared), or None
    when the matcher refuses them or has terminated."""
    from workers.grammar_masks import clear_token, new_bitmask

    g = backend.matcher(cg, [EOS], "t", frozenset([MASK]))
    if g.accept(tokens) != len(tokens) or g.terminated:
        return None
    bm = new_bitmask(1, V)
    g.matcher.fill_next_token_bitmask(bm, 0)
    clear_token(bm, [0], MASK)
    return bm[0]


def allowed(bm_row: torch.Tensor) -> torch.Tensor:
    """[V] bool from one bitmask row."""
    bits = (bm_row.long()[:, None] >> torch.arange(32)) & 1
    return bits.reshape(-1)[:V].bool()


@torch.no_grad()
def exact_constrained_law(model, prompt: list[int], spec: dict, T: float, top_k: int = -1, top_p: float = 1.0,
                          max_len: int = 8) -> dict[tuple[int, ...], float]:
    """P(output) of constrained AR sampling, by enumerating every sequence the grammar allows (dense
    forwards, mask from a fresh matcher, then temperature / top-k / top-p): {tokens: probability}."""
    backend, cg = compiled(spec)
    law: dict[tuple[int, ...], float] = {}
    frontier = [((), 1.0)]
    t, tk, tp = torch.tensor([T]), torch.tensor([top_k]), torch.tensor([top_p])
    while frontier:
        nxt = []
        for seq, pr in frontier:
            ids = torch.tensor([prompt + list(seq)])
            h = model(ids, torch.arange(ids.shape[1])[None])
            logits = model.compute_logits(h[0, -1])[None].float()
            ok = allowed(fresh_mask(backend, cg, list(seq)))
            logits = torch.where(ok, logits, torch.full_like(logits, float("-inf")))
            probs = processed_probs(logits, t, tk, tp)[0].double()
            for tok in probs.nonzero().squeeze(1).tolist():
                s2, p2 = seq + (tok,), pr * float(probs[tok])
                if tok == EOS:
                    law[s2] = p2
                elif len(s2) < max_len:
                    nxt.append((s2, p2))
                else:
                    raise AssertionError(f"grammar allows outputs longer than {max_len}: {s2}")
        frontier = nxt
    return law
