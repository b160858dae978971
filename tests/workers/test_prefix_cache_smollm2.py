"""Prefix caching on SmolLM2-135M-Instruct (fp32): a shared system prompt, different questions and a
second turn that holds the first reply give exactly the token ids of the cache-off engine in AR,
ISD N=4 and R-ISD with the shipped demo adapter, greedy and seeded: requests together (hits on a
prefix being prefilled), repeated (hits on finished requests) and second turns."""

from __future__ import annotations

import pytest

from workers import LLM, SamplingParams
from workers.aliases import default_adapter
from workers.engine import LoadedModel
from workers.loader import load_adapter, load_model, load_tokenizer

SYSTEM = (
    "You are a careful assistant for a small science museum. Answer visitors' questions in one or two "
    "plain sentences, avoid jargon, and when a question is about safety, remind them to ask a member of "
    "staff. The museum has halls on astronomy, geology, the human body, electricity and the history of "
    "flight; the cafe is on the ground floor and the planetarium show starts every hour."
)
QUESTIONS = ["Why is the sky blue?", "Where is the cafe?", "What is a volcano?"]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    model, cfg = load_model(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    return model, cfg, tok


def _chat(tok, *turns: str) -> list[int]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _engine(smol, mode: str, cache: bool) -> LLM:
    model, cfg, tok = smol
    model.has_lora = mode == "risd"
    return LLM(loaded=LoadedModel(model, cfg, tok, 16, "smollm2"), mode=mode, stride=1 if mode == "ar" else 4,
               adaptive_stride=False, kv_cache_tokens=4096, enable_prefix_caching=cache)


def _ids(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompts, params)]


def test_identity_on_smollm2(smol):
    model, _, tok = smol
    prompts = [_chat(tok, q) for q in QUESTIONS]
    assert len(prompts[0]) > 80  # the system prompt spans several 16-token blocks
    greedy = [SamplingParams(temperature=0, max_tokens=12)] * len(prompts)
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, seed=40 + i, max_tokens=12) for i in range(len(prompts))]
    for mode, params in (("ar", seeded), ("ar", greedy), ("isd", greedy), ("risd", greedy)):
        if mode == "risd" and not getattr(model, "_idlm_demo_adapter", False):
            load_adapter(model, default_adapter("smollm2"))
            model._idlm_demo_adapter = True
        off, on = _engine(smol, mode, False), _engine(smol, mode, True)
        ref = _ids(off, prompts, params)
        # together: the first request prefills the system prompt, the others wait a step and hit it
        assert _ids(on, prompts, params) == ref, f"{mode} together"
        st = on.stats()
        assert st.prefix_cache_hits >= (len(prompts) - 1) * 64, st
        if params is seeded:
            continue
        # again: whole prompts from the cache of finished requests, only the last token fed
        assert _ids(on, prompts, params) == ref, f"{mode} repeated"
        # second turn: the conversation so far (system, question, the reply) plus a new question
        replies = [tok.decode(r, skip_special_tokens=True) for r in ref]
        turn2 = [_chat(tok, q, a, "Say that again, shorter.") for q, a in zip(QUESTIONS, replies)]
        assert _ids(on, turn2, params) == _ids(off, turn2, params), f"{mode} second turn"
    model.has_lora = False
