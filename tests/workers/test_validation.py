"""Bad input raises errors that name the field, and never corrupts the engine."""

import pytest

from tests.tiny import tiny_loaded
from workers import LLM, EngineConfig, SamplingParams


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop": [None]}, "stop"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 2.5}, "prompt_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logit_bias": {5: 150}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {-3: 1}}, "logit_bias"),
    ],
)
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_none_stop_lists_mean_none():
    p = SamplingParams(stop=None, stop_token_ids=None)
    assert p.stop == [] and p.stop_token_ids == []


@pytest.mark.parametrize("stride", [0, 17, -1])
def test_stride_out_of_range(stride):
    with pytest.raises(ValueError, match="^stride"):
        EngineConfig(model="x", mode="isd", stride=stride)


def test_bad_mode_and_budget():
    with pytest.raises(ValueError, match="^mode"):
        EngineConfig(mode="diffusion")
    with pytest.raises(ValueError, match="^max_num_batched_tokens"):
        EngineConfig(stride=8, max_num_batched_tokens=8)


def test_prompt_limits_and_engine_keeps_serving():
    llm = LLM(loaded=tiny_loaded(), mode="isd", stride=4, max_model_len=64, kv_cache_tokens=2048)
    eng = llm.engine
    with pytest.raises(ValueError, match="^prompt"):
        eng.add_request(list(range(70)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="^max_tokens"):
        eng.add_request(list(range(40)), SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="^prompt"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="^prompt"):
        eng.add_request([10**9], SamplingParams())
    assert not eng.has_unfinished()
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_prompt_larger_than_kv_budget():
    llm = LLM(loaded=tiny_loaded(), mode="ar", kv_cache_tokens=64, kv_block_size=16)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.engine.add_request(list(range(60)), SamplingParams(max_tokens=20))


def test_model_dependent_limits_name_the_field_and_engine_keeps_serving():
    llm = LLM(loaded=tiny_loaded(vocab_size=64), mode="isd", stride=4, kv_cache_tokens=2048, max_logprobs=5)
    eng = llm.engine
    for params, field in [
        (SamplingParams(logit_bias={64: 1.0}), "logit_bias"),
        (SamplingParams(stop_token_ids=[99]), "stop_token_ids"),
        (SamplingParams(logprobs=6), "logprobs"),
        (SamplingParams(prompt_logprobs=6), "prompt_logprobs"),
        (SamplingParams(n=2), "n"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}"):
            eng.add_request([1, 2, 3], params)
    assert not eng.has_unfinished()
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={"7": 100}))[0]
    assert out.token_ids == [7] * 5  # string keys (JSON) are token ids too
