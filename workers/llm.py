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
        """One result per prompt, in order; a prompt with `n > 1` gives its n samples in a row
        (`CompletionResult.index` 0..n-1, seeds as `SamplingParams.fan_out`)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_lists = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError("params: one SamplingParams per prompt, or a single one for all")
        jobs = [(ids, child, i) for ids, p in zip(token_lists, params) for i, child in enumerate(p.fan_out())]
        order = [self.engine.add_request(ids, child) for ids, child, _ in jobs]
        done: dict[str, CompletionResult] = {}
        partial = {rid: CompletionResult(rid, ids, [], "", None, None, index=i,  # type: ignore[arg-type]
                                         logprobs=[] if child.logprobs is not None else None)
                   for rid, (ids, child, i) in zip(order, jobs)}
        texts: dict[str, list[str]] = {rid: [] for rid in order}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.error is not None:
                    raise (ValueError if out.error.startswith("structured_outputs") else RuntimeError)(out.error)
                res = partial[out.request_id]
                res.token_ids += out.new_token_ids
                texts[out.request_id].append(out.new_text)
                if out.logprobs is not None:
                    res.logprobs += out.logprobs
                if out.prompt_logprobs is not None:
                    res.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    res.text, res.finish_reason, res.metrics = "".join(texts[out.request_id]), out.finish_reason, out.metrics
                    res.num_cached_tokens = out.num_cached_tokens
                    done[out.request_id] = res
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
