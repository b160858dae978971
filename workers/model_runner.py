"""Model runner: turns a `SchedulerOutput` into one forward over a ragged flat batch.

Owns: the model, its KV cache tensors, and input preparation. Every scheduled request contributes
its rows `[real tokens..., drafts..., MASK x m]` at consecutive positions after its cached prefix.
In the flat batch the clean rows (real tokens and drafts) of all requests come first and every MASK
row after them, so the gated LoRA of R-ISD applies to one slice (`lora_from`) with no gathers; the
attention metadata maps each request's rows back to causal order. Logits come back only at the rows
that need them, per final item in the order `[pending, drafts..., MASK rows...]`. Requests that
asked for prompt logprobs also get the hidden states of their prompt rows (`prompt_hidden`; the
lm_head product over them is left to `workers.logprobs`, in bounded chunks); nothing else pays.

Style rule (as vLLM's V2 runner): this file holds the common path only; feature code lives in the
decoder or the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from workers.attention import AttentionMetadata
from workers.kv_cache import allocate_kv_cache
from workers.models.config import ModelConfig
from workers.models.transformer import CausalLM
from workers.scheduler import SchedulerOutput


@dataclass
class RunnerOutput:
    logits: torch.Tensor  # [R, V] float32, rows of final items in item order
    row_offsets: list[int]  # per item: first row in `logits` (-1 when the item is not final)
    prompt_hidden: torch.Tensor | None = None  # [P, H] prompt rows of requests with prompt logprobs
    prompt_spans: list[tuple[int, int, int]] | None = None  # (item index, first position, rows) per span


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        model_config: ModelConfig,
        num_blocks: int,
        block_size: int,
        mask_token_id: int | None,
        use_lora_gate: bool,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.cfg = model_config
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.use_lora_gate = use_lora_gate
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_caches = allocate_kv_cache(model_config, num_blocks, block_size, dtype, self.device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        ids: list[int] = []  # clean rows of every item, in item order
        q_lens, clean_lens, mask_lens, ctx_lens, tables = [], [], [], [], []
        row_offsets: list[int] = []
        logit_ro: list[int] = []  # request-order rows that need logits
        prompt_ro: list[int] = []  # request-order prompt rows whose hidden states go back
        spans: list[tuple[int, int, int]] = []
        n_logits = ro = 0
        for i, it in enumerate(sched.items):
            req = it.request
            if req.params.prompt_logprobs is not None and req.needs_prompt_logits:
                # rows at positions p < prompt_len - 1 predict prompt token p + 1
                start = max(req.num_computed, len(req.prompt_logprobs or ()))
                end = min(req.num_computed + it.num_real, req.num_prompt_tokens - 1)
                if end > start:
                    spans.append((i, start, end - start))
                    prompt_ro += range(ro + start - req.num_computed, ro + end - req.num_computed)
            clean = req.token_slice(req.num_computed, req.num_computed + it.num_real)
            m = 0
            if it.final:
                clean += req.drafts[: it.num_drafts]
                m = it.num_masks
                row_offsets.append(n_logits)
                # `pending` is the last real row; it and everything after it need logits.
                first, end = ro + it.num_real - 1, ro + len(clean) + m
                logit_ro += range(first, end)
                n_logits += end - first
            else:
                row_offsets.append(-1)
            ids += clean
            q_lens.append(len(clean) + m)
            clean_lens.append(len(clean))
            mask_lens.append(m)
            ctx_lens.append(req.num_computed)
            tables.append(req.block_table)
            ro += len(clean) + m
        n_clean, n_mask = len(ids), sum(mask_lens)
        row_of = None
        if n_mask:
            ids += [self.mask_token_id] * n_mask
            row_of = _row_of(q_lens, clean_lens, n_clean)
        dev = self.device
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, self.block_size, dev, row_of=row_of)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)  # [T]
        # R-ISD: MASK rows are rows n_clean.. (possibly none this step; the LoRA layers then use the
        # same packed weights as on MASK steps, so only one packed copy of each weight exists)
        lora_from = n_clean if self.use_lora_gate else None
        hidden = self.model(input_ids, meta.positions, kv_caches=self.kv_caches, meta=meta, lora_from=lora_from)  # [T, H]
        if logit_ro:
            rows = torch.tensor(logit_ro, dtype=torch.long)
            if row_of is not None:
                rows = row_of[rows]
            logits = self.model.compute_logits(hidden.index_select(0, rows.to(dev))).float()  # [R, V]
        else:
            logits = torch.empty(0, self.cfg.vocab_size, device=dev)
        out = RunnerOutput(logits=logits, row_offsets=row_offsets)
        if prompt_ro:
            rows = torch.tensor(prompt_ro, dtype=torch.long)
            if row_of is not None:
                rows = row_of[rows]
            out.prompt_hidden, out.prompt_spans = hidden.index_select(0, rows.to(dev)), spans
        return out


    @torch.inference_mode()
    def time_rows(self, rows: int) -> float:
        """Seconds of one forward of `rows` rows with logits at every row (a decode-like step; as in
        R-ISD blocks, 3 in 7 rows carry the gated LoRA). Writes only KV slots of free blocks."""
        rows = max(1, min(rows, self.kv_caches[0][0].shape[0]))
        blocks = list(range(-(-rows // self.block_size)))
        meta = AttentionMetadata.build([rows], [0], [blocks], self.block_size, self.device)
        ids = torch.zeros(rows, dtype=torch.long, device=self.device)
        lora_from = rows - 3 * rows // 7 if self.use_lora_gate else None
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        h = self.model(ids, meta.positions, kv_caches=self.kv_caches, meta=meta, lora_from=lora_from)
        self.model.compute_logits(h).float()
        sync()
        return time.perf_counter() - t0


def _row_of(q_lens: list[int], clean_lens: list[int], n_clean: int) -> torch.Tensor:
    """[T] flat row of each request-order row: request i's clean rows sit in the first part (in item
    order), its MASK rows in the second part, starting at `n_clean`."""
    ql = torch.tensor(q_lens, dtype=torch.long)
    cl = torch.tensor(clean_lens, dtype=torch.long)
    ml = ql - cl
    rid = torch.repeat_interleave(torch.arange(len(q_lens)), ql)
    j = torch.arange(int(ql.sum())) - (torch.cumsum(ql, 0) - ql)[rid]
    clean_start = torch.cumsum(cl, 0) - cl
    mask_start = n_clean + torch.cumsum(ml, 0) - ml
    return torch.where(j < cl[rid], clean_start[rid] + j, mask_start[rid] + j - cl[rid])
