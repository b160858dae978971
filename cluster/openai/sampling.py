"""Request body -> `workers.SamplingParams`, with the checks that need the served model.

Owns: `to_sampling_params`. Context length (prompt + max_tokens), token ids inside the vocabulary
(`logit_bias`, `stop_token_ids`), every `SamplingParams` range and the shape of `response_format` /
`structured_outputs` (their grammar is parsed by the replica, before it answers) are checked here, so bad input is
a 400 naming the field before anything reaches a replica (the engine checks again: the replica
answers a ValueError, never a crash).
"""

from __future__ import annotations

from cluster.openai.errors import APIError, field_error
from cluster.openai.request_models import _Common
from workers.sampling_params import SamplingParams
from workers.structured_params import FIELD, StructuredOutputs


def _max_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int, prompt_field: str) -> int:
    if prompt_len >= max_model_len:
        raise APIError(400, f"prompt: {prompt_len} tokens exceeds the context length {max_model_len}",
                       prompt_field, "context_length_exceeded")
    room = max_model_len - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(400, f"max_tokens: prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the context "
                       f"length {max_model_len}", "max_tokens", "context_length_exceeded")
    return max_tokens


def _check_token_ids(body: _Common, vocab_size: int) -> dict[int, float] | None:
    bias = None
    if body.logit_bias:
        bias = {}
        for k, v in body.logit_bias.items():
            try:
                tid = int(k)
            except ValueError:
                raise APIError(400, f"logit_bias: keys must be token ids, got {k!r}", "logit_bias") from None
            if not 0 <= tid < vocab_size:
                raise APIError(400, f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab_size})", "logit_bias")
            bias[tid] = v
    if any(t >= vocab_size for t in body.stop_token_ids or ()):
        raise APIError(400, f"stop_token_ids: token ids must be in [0, {vocab_size})", "stop_token_ids")
    return bias


def structured_outputs(body: _Common) -> StructuredOutputs | None:
    """`response_format` / `structured_outputs` -> the engine's constraint (400 naming the field)."""
    rf, so = body.response_format, body.structured_outputs
    if rf is not None and rf.type != "text" and so is not None:
        raise APIError(400, "response_format: cannot be combined with structured_outputs", "response_format")
    if so is not None:
        try:
            return StructuredOutputs(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                     json_object=bool(so.json_object))
        except ValueError as e:
            raise field_error(str(e)) from None
    if rf is None or rf.type == "text":
        if rf is not None and rf.json_schema is not None:
            raise APIError(400, "response_format.json_schema: only with type json_schema", "response_format.json_schema")
        return None
    if rf.type == "json_object":
        return StructuredOutputs(json_object=True)
    js = rf.json_schema
    if js is None or js.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema: required with type json_schema",
                       "response_format.json_schema.schema")
    try:
        return StructuredOutputs(json=js.schema_, strict=bool(js.strict))
    except ValueError as e:  # name the field the client sent
        raise field_error(str(e).replace(f"{FIELD}.json", "response_format.json_schema.schema", 1)) from None


def to_sampling_params(body: _Common, *, prompt_len: int, max_tokens: int | None, max_model_len: int, vocab_size: int,
                       logprobs: int | None, prompt_logprobs: int | None = None,
                       prompt_field: str = "prompt") -> SamplingParams:
    """The parameters of one sample (`n` stays on the body: the caller fans out)."""
    max_tokens = _max_tokens(max_tokens, prompt_len, max_model_len, prompt_field)
    bias = _check_token_ids(body, vocab_size)
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    constraint = structured_outputs(body)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            seed=body.seed,
            n=body.n,
            stop=stop,
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            include_stop_str_in_output=body.include_stop_str_in_output,
            min_tokens=body.min_tokens,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured_outputs=constraint,
        )
    except ValueError as e:
        raise field_error(str(e)) from None
