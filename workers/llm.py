"""Offline API: `LLM(...).generate(prompts, params)` and `.chat(messages, params)`.

Owns: batching a list of prompts through one `LLMEngine` until all finish, and chat templating.
"""

from __future__ import annotations

from collections.abc import Sequence

from workers.config import EngineConfig
from workers.engine import LLMEngine, LoadedModel
from workers.isd import Drafter
from workers.outputs import CompletionResult
from workers.sampling_params import SamplingParams


class LLM:
    def __init__(
        self,
        model: str = "smollm2",
        *,
        loaded: LoadedModel | None = None,
        drafter: Drafter | None = None,
        **config_kwargs,
    ) -> None:
        self.config = EngineConfig(model=model, **config_kwargs)
        self.engine = LLMEngine(self.config, loaded=loaded, drafter=drafter)
        self.tokenizer = self.engine.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_lists = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError("params: one SamplingParams per prompt, or a single one for all")
        order = [self.engine.add_request(ids, p) for ids, p in zip(token_lists, params)]
        prompt_of = dict(zip(order, token_lists))
        done: dict[str, CompletionResult] = {}
        tokens: dict[str, list[int]] = {rid: [] for rid in order}
        texts: dict[str, list[str]] = {rid: [] for rid in order}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                tokens[out.request_id] += out.new_token_ids
                texts[out.request_id].append(out.new_text)
                if out.finished:
                    done[out.request_id] = CompletionResult(
                        request_id=out.request_id,
                        prompt_token_ids=prompt_of[out.request_id],
                        token_ids=tokens[out.request_id],
                        text="".join(texts[out.request_id]),
                        finish_reason=out.finish_reason,
                        metrics=out.metrics,
                        num_cached_tokens=out.num_cached_tokens,
                    )
        return [done[rid] for rid in order]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | None = None,
    ) -> list[CompletionResult]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.encode_chat(c) for c in convs], params)  # type: ignore[arg-type]

    def stats(self):
        return self.engine.stats.snapshot()

    def reset_prefix_cache(self) -> int:
        return self.engine.reset_prefix_cache()
