"""Per-request sampling parameters (the OpenAI / vLLM knobs the engine honours), validated on creation.

Owns: `SamplingParams`. Invalid values raise `ValueError` whose message starts with the field name,
so the HTTP layer can turn it into a 400 naming the parameter. Limits that depend on the served
model (token ids inside the vocabulary, `logprobs` up to the engine's `max_logprobs`) are checked by
the engine when the request is added (`LLMEngine.validate`).

Processing order of a row's logits (vLLM's, shared by AR and every ISD row; see
`workers.logits_processors`): the grammar mask (`structured_outputs`) -> `logit_bias` -> `min_tokens` ban of the stop set -> repetition,
frequency and presence penalties -> temperature -> `min_p` -> top-k -> top-p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from workers.structured_params import StructuredOutputs

MAX_N = 16
"""Most samples per prompt (`n`)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    """0 means greedy (argmax drafting, exact-match verification)."""
    top_k: int = -1
    """-1 or 0: off."""
    top_p: float = 1.0
    min_p: float = 0.0
    """Keep tokens whose probability (after temperature) is >= min_p * the top token's; 0: off."""
    seed: int | None = None
    """Same seed, same output; requests without one get a seed from the engine's generator."""
    n: int = 1
    """Samples per prompt. The engine runs one sample per request: callers fan out with `fan_out()`."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    """EOS and `stop_token_ids` are banned (and stop strings not checked) until this many tokens."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already in the output (OpenAI semantics), -2..2."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence of the token in the output, -2..2."""
    repetition_penalty: float = 1.0
    """Tokens of prompt or output: positive logits divided by it, negative ones multiplied; 1: off."""
    logit_bias: dict[int, float] | None = None
    """Token id -> bias in [-100, 100], added to the logit."""
    logprobs: int | None = None
    """Return the log-probability of every generated token and the `logprobs` most likely ones."""
    prompt_logprobs: int | None = None
    """Return the log-probability of every prompt token (the first has none) and the top ones."""
    structured_outputs: StructuredOutputs | None = None
    """Constrain the output to a JSON Schema, regex, choice list or EBNF grammar (`workers.grammar`);
    a dict of `StructuredOutputs` fields is accepted too."""

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens: must be a positive integer, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k: must be -1 (off), 0 (off) or a positive integer, got {self.top_k!r}")
        if not _is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not _is_num(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
        if not _is_int(self.n) or not (1 <= self.n <= MAX_N):
            raise ValueError(f"n: must be an integer in 1..{MAX_N}, got {self.n!r}")
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids: must be non-negative integers")
        if not _is_int(self.min_tokens) or not (0 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"min_tokens: must be an integer in 0..max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not (-2.0 <= v <= 2.0):
                raise ValueError(f"{name}: must be in [-2, 2], got {v!r}")
            setattr(self, name, float(v))
        if not _is_num(self.repetition_penalty) or not (0.0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty!r}")
        self._check_logit_bias()
        self.structured_outputs = StructuredOutputs.coerce(self.structured_outputs)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"{name}: must be a non-negative integer (the number of top tokens) or None, got {v!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.repetition_penalty = float(self.repetition_penalty)
        if self.top_k == 0:
            self.top_k = -1

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias: must map token ids to biases")
        bias = {}
        for k, v in self.logit_bias.items():
            try:
                tid = int(k)  # JSON object keys arrive as strings
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias: keys must be token ids, got {k!r}") from None
            if tid < 0 or (isinstance(k, str) and str(tid) != k.strip()):
                raise ValueError(f"logit_bias: keys must be non-negative token ids, got {k!r}")
            if not _is_num(v) or not (-100.0 <= v <= 100.0):
                raise ValueError(f"logit_bias: biases must be in [-100, 100], got {v!r} for token {tid}")
            bias[tid] = float(v)
        self.logit_bias = bias or None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def has_processors(self) -> bool:
        """True when the request's logits need any processing before sampling / verification."""
        return (self.has_penalties or self.logit_bias is not None or self.min_tokens > 0
                or (self.min_p > 0.0 and self.temperature > 0.0))

    def to_dict(self) -> dict:
        """The fields as a plain dict (what crosses process boundaries; `SamplingParams(**d)` rebuilds it)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.structured_outputs is not None:
            d["structured_outputs"] = self.structured_outputs.to_dict()
        return d

    def fan_out(self) -> list[SamplingParams]:
        """The `n` one-sample requests of these parameters: sample i gets seed `seed + i` (vLLM's
        rule) when a seed is given, else an independent seed from the engine."""
        if self.n == 1:
            return [self]
        return [replace(self, n=1, seed=None if self.seed is None else self.seed + i) for i in range(self.n)]
