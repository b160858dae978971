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
    ],
)
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


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
