"""The synchronous engine: `add_request` / `abort` / `step()` = schedule -> forward -> verify/commit.

Owns: wiring of config, model, tokenizer, scheduler, model runner, ISD decoder and output
processor, plus admission checks and stats recording. Runs without Ray; `workers.async_engine`
drives it from a background thread for the cluster, `workers.llm` for offline use.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass

import torch

from idlm_kernels.rng import request_key
from workers import logprobs
from workers.batch_invariance import invariance_failures
from workers.block_manager import BlockManager
from workers.config import EngineConfig
from workers.cpu_gemm import apply_gemm_rows, choose_gemm_rows
from workers.detokenizer import OutputProcessor
from workers.draft_guard import DraftGuard
from workers.draft_layout import startup_costs
from workers.grammar import GrammarBackend, GrammarManager
from workers.isd import Drafter, ISDDecoder, RoundResult
from workers.model_runner import ModelRunner
from workers.models.config import ModelConfig
from workers.models.linear import cpu_gemm_backend
from workers.models.transformer import CausalLM
from workers.outputs import RequestOutput
from workers.request import Request, RequestStatus
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler
from workers.stats import StatsCollector
from workers.stride import StridePolicy

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: object | None
    mask_token_id: int | None
    name: str
    token_strings: list[str] | None = None
    """The decoded vocabulary, for grammars on a model without a tokenizer (tests' tiny models)."""


def load_engine_model(config: EngineConfig) -> LoadedModel:
    """Resolves the model source, loads weights, tokenizer and (risd) the gated LoRA adapter."""
    from workers import aliases, loader

    model_dir = loader.resolve_model(config.model)
    dtype = _DTYPES[config.dtype]
    model, mcfg = loader.load_model(model_dir, dtype=dtype, device=config.device)
    tokenizer = loader.load_tokenizer(model_dir)
    mask_id = mcfg.mask_token_id
    if config.mode == "risd":
        adapter = config.adapter or aliases.default_adapter(config.model)
        if adapter is None:
            raise ValueError("adapter: risd mode needs a gated LoRA adapter directory (PEFT format)")
        info = loader.load_adapter(model, adapter)
        mask_id = info.mask_token_id if info.mask_token_id is not None else mask_id
    if config.stride > 1 and mask_id is None:
        mask_id = aliases.default_mask_token_id(config.model, mcfg)
    if config.mask_token_id is not None:
        mask_id = config.mask_token_id
    model.eval()
    return LoadedModel(model, mcfg, tokenizer, mask_id, config.model)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        self.config = config
        loaded = loaded or load_engine_model(config)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.mask_token_id = loaded.mask_token_id
        if config.stride > 1 and self.mask_token_id is None:
            raise ValueError("mask_token_id: ISD needs a MASK token id (model config, adapter config or engine config)")
        mcfg = loaded.config
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        self.blocks = BlockManager(config.num_blocks, config.kv_block_size)
        self.runner = ModelRunner(
            loaded.model,
            mcfg,
            config.num_blocks,
            config.kv_block_size,
            self.mask_token_id,
            use_lora_gate=config.mode == "risd",
            device=config.device,
            dtype=_DTYPES[config.dtype],
            enforce_eager=config.enforce_eager,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
        )
        if config.draft_anchors == "every" and self.runner.kernel_path:
            raise ValueError("draft_anchors: 'every' needs the SDPA attention path (IDLM_ATTENTION=torch); "
                             "the Triton kernel path has no per-group masks")
        self.every_anchor = config.stride > 1 and (config.draft_anchors == "every" or (
            config.draft_anchors == "auto" and not self.runner.kernel_path))
        model = loaded.model
        cpu = self.runner.device.type == "cpu"
        if cpu and config.dtype == "float32" and cpu_gemm_backend() == "auto" and getattr(model, "gemm_rows", None) is None:
            # Which GEMM is faster at a few rows depends on the CPU: measured once per loaded fp32
            # model (engines sharing a model share it), before the stride policy calibrates its costs.
            model.gemm_rows = choose_gemm_rows(self.runner.time_rows, lambda rows: apply_gemm_rows(model, rows))
        if cpu and config.dtype != "float32" and not hasattr(model, "batch_invariant"):
            bad = invariance_failures(model)  # bf16 exactness rests on measured kernel properties
            model.batch_invariant = not bad
            if bad:
                log.warning("%s kernels not batch-invariant here (%s): ISD may leave AR at near-ties", config.dtype, bad)
        self.batch_invariant: bool | None = getattr(model, "batch_invariant", None)  # None: fp32 / GPU
        # A short start-up calibration of step time against rows (refined online by `step`), and
        # the `auto` layout for this machine's GEMM row split (workers.draft_layout)
        self.every_anchor, cost = startup_costs(config, self.runner.time_rows, self.every_anchor,
                                                getattr(model, "gemm_rows", None))
        self.policy = StridePolicy(config.stride, adaptive=config.adaptive_stride, cost=cost,
                                   every_anchor=self.every_anchor, guard=DraftGuard() if config.stride_guard else None)
        self.scheduler = Scheduler(config, self.blocks, self.max_model_len, self.policy, every_anchor=self.every_anchor)
        eos = list(mcfg.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.decoder = ISDDecoder(mcfg.vocab_size, draft_mode=config.extra.get("draft_mode", "sample"), drafter=drafter,
                                  eos_token_ids=eos, logprobs_mode=config.logprobs_mode,
                                  mask_token_id=self.mask_token_id, grammar_drafts=config.grammar_drafts)
        self.grammars = GrammarManager(lambda: GrammarBackend(
            self.tokenizer, mcfg.vocab_size, sorted(set(eos)), token_strings=loaded.token_strings,
            cache_limit_bytes=config.grammar_cache_mb << 20, compile_timeout_s=config.grammar_compile_timeout_s), eos, self.mask_token_id)
        self.output = OutputProcessor(self.tokenizer, eos)
        self.stats = StatsCollector(config.stride)
        self.requests: dict[str, Request] = {}
        self._seed_rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._hash_root = config.cache_namespace()

    # -- requests ----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt: must contain at least one token")
        V = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= V for t in prompt_token_ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {V})")
        if n >= self.max_model_len:
            raise ValueError(f"prompt: {n} tokens is longer than the context length max_model_len={self.max_model_len}")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens: prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len={self.max_model_len}"
            )
        self._validate_params(params, V)
        need = self.blocks.blocks_for(n + params.max_tokens + 2 * self.config.stride)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"prompt: prompt + max_tokens needs {need} KV blocks but the cache has {self.blocks.num_blocks} "
                f"(kv_cache_tokens={self.blocks.num_blocks * self.blocks.block_size})"
            )

    def _validate_params(self, params: SamplingParams, V: int) -> None:
        """The model-dependent limits of SamplingParams (their own ranges are checked on creation)."""
        if params.n != 1:
            raise ValueError(f"n: the engine runs one sample per request (got n={params.n}); "
                             "submit SamplingParams.fan_out() as separate requests")
        if params.logit_bias and max(params.logit_bias) >= V:
            raise ValueError(f"logit_bias: token id {max(params.logit_bias)} is outside the vocabulary [0, {V})")
        if any(t >= V for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids: token ids must be in [0, {V})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"{name}: at most {self.config.max_logprobs} (max_logprobs), got {k}")
        self.grammars.validate(params)

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None, cache_salt: str | None = None
    ) -> str:
        """`cache_salt`: requests share cached prefix blocks only with requests of the same salt
        (tenant isolation, as vLLM's `cache_salt`)."""
        prompt_token_ids = list(prompt_token_ids)
        self.validate(prompt_token_ids, params)
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt: must be a string, got {type(cache_salt).__name__}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request_id: {rid!r} is already running")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        req = Request(rid, prompt_token_ids, params, rng_key=request_key(seed))
        req.hash_root = self.config.cache_namespace(cache_salt) if cache_salt else self._hash_root
        req.accept_state = self.policy.acceptance.new_state()
        self.grammars.admit(req)
        self.requests[rid] = req
        self.scheduler.add(req)
        with self.stats as (st, _):
            st.prompt_tokens += len(prompt_token_ids)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.remove(req)
        self.grammars.forget(request_id)
        req.finish_reason = "abort"
        out = self._finish(req, [], time.monotonic())
        self._update_gauges()
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix block (e.g. after new weights); returns how many. Running
        requests keep their KV. Safe at any step boundary."""
        n = self.blocks.reset_prefix_cache()
        self._update_gauges()
        return n

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.monotonic()
        failed = self._poll_grammars(t0)
        sched = self.scheduler.schedule()
        if not sched.items:
            if self.grammars.pending and not failed:
                self.grammars.wait(0.05)  # only compilations to wait for
            self._update_gauges()
            return failed
        runner_out = self.runner.execute(sched)
        if runner_out.prompt_spans:
            self._gather_prompt_logprobs(sched, runner_out)
        results = self.decoder.process(sched, runner_out)
        by_req = {id(r.item): r for r in results}
        for it in sched.items:
            res = by_req.get(id(it))
            self.scheduler.commit(it, res.num_accepted if res else 0)
        now = time.monotonic()
        committed = [o for r in results if (o := self._apply(r, now)) is not None]
        outputs = failed + committed
        rows, elapsed = sched.num_tokens, now - t0
        if self.policy.guard is not None:  # after _apply, which asks the guard whether it forced AR
            self.policy.guard.end_step(sum(len(o.new_token_ids) for o in committed), elapsed,
                                       counted=all(it.num_real == 1 for it in sched.items))
        cost = self.policy.cost
        # Decode-like steps (most rows need logits) are where the cost model is used: they refine
        # it, and their prediction and measurement are tracked side by side (moving averages).
        decode_like = cost is not None and 2 * runner_out.logits.shape[0] >= rows
        masks = sum(it.num_masks for it in sched.items)
        predicted = cost.predict(rows, masks) if decode_like else 0.0
        if decode_like:
            cost.observe(rows, elapsed, masks)
        with self.stats as (st, obs):
            st.steps += 1
            st.preemptions += len(sched.preempted)
            st.add_prefix_cache(sched.cache)
            if self.policy.guard is not None:
                st.stride_guard_steps = dict(self.policy.guard.steps_by_arm)
            if decode_like:
                w = 1.0 if st.step_time_measured == 0.0 else 0.1  # moving averages, seeded by the first step
                st.step_time_predicted += w * (predicted - st.step_time_predicted)
                st.step_time_measured += w * (elapsed - st.step_time_measured)
            obs.step_duration.append(elapsed)
        self._update_gauges()
        return outputs

    def _poll_grammars(self, now: float) -> list[RequestOutput]:
        """Matchers for the requests whose grammar compiled; failed or timed-out compilations
        end their request (only that one) with the error."""
        if not self.grammars.pending:
            return []
        return [self._fail(req, err, now) for req, err in self.grammars.poll(now)]

    def _fail(self, req: Request, error: str, now: float) -> RequestOutput:
        self.requests.pop(req.request_id, None)
        self.scheduler.remove(req)
        req.finish_reason = "error"
        out = self._finish(req, [], now)
        out.error = error
        return out

    def _gather_prompt_logprobs(self, sched, out) -> None:
        pos = 0
        for i, start, n in out.prompt_spans:
            req = sched.items[i].request
            if req.prompt_logprobs is None:
                req.prompt_logprobs = []
            if start != len(req.prompt_logprobs):  # an engine bug (e.g. a prefix-cache hit skipped rows)
                raise RuntimeError(f"prompt_logprobs of {req.request_id}: rows from {len(req.prompt_logprobs)} "
                                   f"expected, got {start}")
            targets = req.prompt_token_ids[start + 1 : start + 1 + n]
            with torch.inference_mode():
                req.prompt_logprobs += logprobs.prompt_logprobs(
                    self.runner.model.compute_logits, out.prompt_hidden[pos : pos + n], targets, req.params.prompt_logprobs)
            pos += n

    def _apply(self, res: RoundResult, now: float) -> RequestOutput | None:
        req = res.item.request
        kept = self.output.append(req, res.tokens)
        if req.grammar is not None and req.grammar.accept(kept) != len(kept):
            # every kept token came from a masked row: a refusal means the masks are wrong
            return self._fail(req, f"grammar desync: the matcher refused output token of {req.request_id}", now)
        lps = res.logprobs[: len(kept)] if res.logprobs is not None else None
        m = req.metrics
        m.num_forwards += 1
        m.num_draft_tokens += res.num_drafts
        m.num_accepted_tokens += res.num_accepted
        m.num_output_tokens = req.num_output_tokens
        if res.num_drafts:
            self.policy.acceptance.observe(req.accept_state, res.num_drafts, res.num_accepted)
        elif res.item.stride <= 1 and req.accept_state is not None and not (
                self.policy.guard is not None and self.policy.guard.forcing_ar):
            # a stride the policy chose (the guard's AR epochs say nothing about this request)
            self.policy.acceptance.age(req.accept_state)
        with self.stats as (st, obs):
            st.generation_tokens += len(kept)
            st.decode_forwards += 1
            st.draft_tokens += res.num_drafts
            st.accepted_tokens += res.num_accepted
            for j, ok in enumerate(res.accepted):
                st.drafts_per_pos[j] += 1
                st.accepted_per_pos[j] += int(ok)
            st.rounds[res.kind] += 1
            st.rounds_by_stride[res.item.stride] = st.rounds_by_stride.get(res.item.stride, 0) + 1
            if m.first_token_time is None:
                m.first_token_time = now
                obs.time_to_first_token.append(now - m.arrival_time)
                if len(kept) > 1:
                    obs.inter_token_latency.extend([0.0] * (len(kept) - 1))
            elif kept:
                # Tokens committed together share the interval since the previous commit.
                obs.inter_token_latency.extend([(now - req.last_emit_time) / len(kept)] * len(kept))
        req.last_emit_time = now
        if req.finish_reason is not None:
            self.requests.pop(req.request_id, None)
            self.scheduler.remove(req)
            return self._finish(req, kept, now, lps)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=kept,
            new_text=self.output.text_delta(req, finished=False),
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            logprobs=lps,
            prompt_logprobs=self._take_prompt_logprobs(req),
            num_cached_tokens=req.num_cached_tokens,
        )

    @staticmethod
    def _take_prompt_logprobs(req: Request) -> list | None:
        """The prompt logprobs, on the request's first output only (first entry None: no context)."""
        if req.params.prompt_logprobs is None or req.prompt_logprobs_sent:
            return None
        req.prompt_logprobs_sent = True
        return [None] + list(req.prompt_logprobs or [])

    def _finish(self, req: Request, kept: list[int], now: float, lps: list | None = None) -> RequestOutput:
        req.status = RequestStatus.FINISHED
        m = req.metrics
        m.finish_time = now
        m.num_output_tokens = req.num_output_tokens
        with self.stats as (st, obs):
            st.requests[req.finish_reason] = st.requests.get(req.finish_reason, 0) + 1
            obs.e2e_request_latency.append(now - m.arrival_time)
            if m.num_forwards:
                obs.request_tokens_per_forward.append(m.tokens_per_forward)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=kept,
            new_text=self.output.text_delta(req, finished=True),
            finished=True,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            metrics=m,
            logprobs=lps,
            prompt_logprobs=self._take_prompt_logprobs(req),
        )

    def _update_gauges(self) -> None:
        with self.stats as (st, _):
            st.num_running = len(self.scheduler.running)
            st.num_waiting = len(self.scheduler.waiting)
            st.kv_cache_usage = self.blocks.usage
            st.kv_cache_cached_blocks = self.blocks.num_cached
            st.prefix_cache_evictions = self.blocks.evictions
            st.queued_prefill_tokens = self.scheduler.queued_prefill_tokens()
