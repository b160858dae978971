"""Structured outputs are valid: for five JSON schemas (nested objects, bounded arrays, enums,
numbers, `$ref`/`anyOf`), a regex, a choice list and an EBNF grammar, every output that finishes
with `stop` parses and validates (`jsonschema`; `re.fullmatch`; the choice list; the grammar's
language), at T = 0, 0.7 and 1.0 with top-k / top-p, stride N = 2, 3, 4, in mixed batches with
unconstrained requests; on tiny random models (real byte-level tokenizer) and on SmolLM2 with the
shipped R-ISD adapter (where greedy constrained R-ISD must also equal greedy constrained AR). Bad
constraints are a ValueError naming the field, and the engine keeps serving.
"""

import json
import re

import jsonschema
import pytest

from tests.models import RESERVED_ID
from workers import LLM, SamplingParams
from workers.config import EngineConfig
from workers.engine import load_engine_model

SCHEMAS = {
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"]}}, "required": ["user"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
             "required": ["color", "ok"]},
    "numbers": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1},
                                                 "n": {"type": "integer", "minimum": 10, "maximum": 99}},
                "required": ["x", "n"]},
    "ref_anyof": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                                   "required": ["x"]}},
                  "type": "object", "properties": {"p": {"$ref": "#/$defs/pt"},
                                                   "v": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}},
                  "required": ["p", "v"]},
}
REGEX = "[a-z]{2,5}-[0-9]{1,3}"
CHOICES = ["yes", "no", "maybe so"]
EBNF = 'root ::= "(" num ("+" num)? ("+" num)? ")"\nnum ::= [0-9]'
EBNF_RE = r"\([0-9](\+[0-9]){0,2}\)"


def constraints():
    out = [(f"json:{k}", {"json": s}) for k, s in SCHEMAS.items()]
    out += [("regex", {"regex": REGEX}), ("choice", {"choice": CHOICES}), ("grammar", {"grammar": EBNF}),
            ("json_object", {"json_object": True})]
    return out


def check_valid(name: str, text: str) -> None:
    if name.startswith("json:"):
        jsonschema.validate(json.loads(text), SCHEMAS[name[5:]])
    elif name == "json_object":
        assert isinstance(json.loads(text), dict)
    elif name == "regex":
        assert re.fullmatch(REGEX, text), text
    elif name == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(EBNF_RE, text), text


SAMPLING = [dict(temperature=0.0), dict(temperature=0.7, top_k=20), dict(temperature=1.0, top_p=0.9)]


def run_mixed(llm: LLM, prompt: list[int], max_tokens: int, samplings=SAMPLING, seeds=(0,)):
    """Every constraint x sampling x seed, plus unconstrained requests, in one batch."""
    jobs, params = [], []
    for name, spec in constraints():
        for sp in samplings:
            for seed in seeds:
                jobs.append(name)
                params.append(SamplingParams(max_tokens=max_tokens, seed=seed, structured_outputs=spec, **sp))
    for sp in samplings:
        jobs.append(None)
        params.append(SamplingParams(max_tokens=max_tokens, seed=7, **sp))
    outs = llm.generate([prompt] * len(params), params)
    stopped = 0
    for name, o in zip(jobs, outs):
        if name is not None and o.finish_reason == "stop":
            check_valid(name, o.text)
            stopped += 1
    return jobs, outs, stopped


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_every_stopped_output_validates_tiny(tiny_llama_dir, stride):
    # fixed stride: the drafted path is under test (the adaptive policy runs a random model AR)
    llm = LLM(tiny_llama_dir, mode="isd", stride=stride, adaptive_stride=False, mask_token_id=RESERVED_ID,
              kv_cache_tokens=32768, max_num_batched_tokens=2048)
    prompt = llm.encode_chat([{"role": "user", "content": "Give me JSON."}])
    jobs, outs, stopped = run_mixed(llm, prompt, 48)
    constrained = sum(j is not None for j in jobs)
    assert stopped >= constrained // 2  # most finish inside the budget: the check is not vacuous
    assert llm.stats().draft_tokens > 0
    # greedy constrained ISD equals greedy constrained AR
    greedy = [SamplingParams(max_tokens=48, temperature=0, structured_outputs=spec) for _, spec in constraints()]
    ar = LLM(tiny_llama_dir, mode="ar", kv_cache_tokens=32768, max_num_batched_tokens=2048)
    want = [o.token_ids for o in ar.generate([prompt] * len(greedy), greedy)]
    assert [o.token_ids for o in llm.generate([prompt] * len(greedy), greedy)] == want


def test_bad_constraints_are_errors_naming_the_field(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, mode="isd", stride=4, mask_token_id=RESERVED_ID, kv_cache_tokens=8192)
    eng = llm.engine
    bad = [({"json": {"type": "strin"}}, "structured_outputs.json"),
           ({"json": {"type": "array", "uniqueItems": True}}, "structured_outputs.json"),
           ({"json": {"oneOf": [{"type": "integer"}]}}, "structured_outputs.json"),
           ({"regex": "(a"}, "structured_outputs.regex"),
           ({"grammar": "root ::= x"}, "structured_outputs.grammar"),
           ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
           ({"json": "{not json"}, "structured_outputs.json")]
    for spec, field in bad:
        with pytest.raises(ValueError) as e:
            eng.add_request([5, 6, 7], SamplingParams(max_tokens=4, structured_outputs=spec))
        assert str(e.value).startswith(field + ":"), str(e.value)
    with pytest.raises(ValueError, match="^structured_outputs: a constrained request needs a stop token"):
        eng.add_request([5, 6], SamplingParams(max_tokens=4, ignore_eos=True, structured_outputs={"regex": "a+"}))
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, structured_outputs={"choice": CHOICES}))
    assert out[0].text in CHOICES and out[0].finish_reason == "stop"  # still serving


def test_compile_timeout_fails_only_that_request(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, mode="isd", stride=4, mask_token_id=RESERVED_ID, kv_cache_tokens=8192,
              grammar_compile_timeout_s=1e-9)
    eng = llm.engine
    rid = eng.add_request([5, 6, 7], SamplingParams(max_tokens=4, structured_outputs={"json": SCHEMAS["nested"]}))
    ok = eng.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert done[rid].finish_reason == "error" and done[rid].error.startswith("structured_outputs:")
    assert done[ok].finish_reason == "length"


@pytest.fixture(scope="module")
def smollm2_risd(smollm2_dir):
    return load_engine_model(EngineConfig(model="smollm2", mode="risd", stride=4))


def _smollm2_prompt(llm):
    return llm.encode_chat([{"role": "user", "content": "Describe a cat as JSON with its color and whether it is ok."}])


def test_smollm2_constrained_risd_valid_and_greedy_equals_ar(smollm2_risd):
    loaded = smollm2_risd
    llm = LLM(loaded=loaded, mode="risd", stride=4, kv_cache_tokens=4096, max_num_seqs=8, adaptive_stride=False)
    prompt = _smollm2_prompt(llm)
    params = [SamplingParams(max_tokens=24, temperature=0, structured_outputs={"json": SCHEMAS["enum"]}),
              SamplingParams(max_tokens=6, temperature=1.0, seed=2, structured_outputs={"choice": CHOICES})]
    outs = llm.generate([prompt] * len(params), params)
    for o, name in zip(outs, ["json:enum", "choice"]):
        assert o.finish_reason == "stop", o.text
        check_valid(name, o.text)
    loaded.model.has_lora = False
    try:
        ar = LLM(loaded=loaded, mode="ar", kv_cache_tokens=4096, max_num_seqs=8, adaptive_stride=False)
        assert ar.generate([prompt], params[0])[0].token_ids == outs[0].token_ids
    finally:
        loaded.model.has_lora = True


@pytest.mark.slow
def test_smollm2_every_stopped_output_validates(smollm2_risd):
    """All constraints x samplings on the real model, in one mixed batch (a few minutes on CPU)."""
    llm = LLM(loaded=smollm2_risd, mode="risd", stride=4, kv_cache_tokens=32768, max_num_seqs=64)
    jobs, _, stopped = run_mixed(llm, _smollm2_prompt(llm), 64)
    assert stopped >= sum(j is not None for j in jobs) // 2
