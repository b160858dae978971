"""Model runner: turns a `SchedulerOutput` into one forward over a ragged flat batch.

Owns: the model, its KV cache tensors, the choice of attention path and input preparation. Every
scheduled request contributes its rows `[real tokens..., drafts..., MASK x m]` at consecutive
positions after its cached prefix. In the flat batch the clean rows (real tokens and drafts) of all
requests come first and every MASK row after them, so the gated LoRA of R-ISD applies to one slice
(`lora_from`) with no gathers; the attention metadata maps each request's rows back to causal order
(`workers.batch_layout`). Logits come back only at the rows that need them, per final item in the
order `[pending, drafts..., MASK rows...]`.

Attention paths: the SDPA gather path (`workers.attention`: CPU, and CUDA under
`IDLM_ATTENTION=torch`) or the Triton kernel path (`workers.kernel_attention`: CUDA by default).
On the kernel path a step's inputs are one packed int32 tensor (one host-to-device copy); the
metadata is built from it on the device; decode steps replay CUDA graphs (`workers.cuda_graphs`)
unless `enforce_eager`. Requests that asked
for prompt logprobs also get the hidden states of their prompt rows (`prompt_hidden`; the lm_head
product over them is left to `workers.logprobs`, in bounded chunks); nothing else pays.

Style rule (as vLLM's V2 runner): this file holds the common path only; feature code lives in the
decoder or the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import idlm_kernels
from workers.attention import AttentionMetadata
from workers.batch_layout import StepBatch, build_step_batch, flat_rows, request_index
from workers.config import MAX_STRIDE
from workers.cuda_graphs import CudaGraphRunner, capture_buckets, graph_padding
from workers.kernel_attention import KernelMetadata, StepShape, pack_step
from workers.kv_cache import allocate_kv_cache
from workers.models.config import ModelConfig
from workers.models.transformer import CausalLM

if TYPE_CHECKING:  # the scheduler pulls in numpy (workers.stride); the runner needs only torch
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
        enforce_eager: bool = False,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        self.model = model
        self.cfg = model_config
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.use_lora_gate = use_lora_gate
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_caches = allocate_kv_cache(model_config, num_blocks, block_size, dtype, self.device)
        self.kernel_path = idlm_kernels.attention_backend(self.device) == "triton"
        self.max_model_len = max_model_len or model_config.max_position_embeddings
        self.max_num_seqs = max_num_seqs
        self.graphs: CudaGraphRunner | None = None
        if self.kernel_path and self.device.type == "cuda" and not enforce_eager:
            self.enable_graphs()

    def enable_graphs(self, capture: bool = True) -> None:
        """Decode steps padded to graph shapes (`workers.cuda_graphs`) and replayed from CUDA graphs;
        `capture=False` runs the same padded steps eagerly from the static buffer (CPU tests)."""
        if not self.kernel_path:
            raise ValueError("enable_graphs: CUDA graphs need the kernel attention path (IDLM_ATTENTION=triton)")
        self.buckets = capture_buckets(self.max_num_seqs)
        # every graph's block table has room for the longest context plus a block of rows
        self.graph_width = -(-(self.max_model_len + 2 * MAX_STRIDE) // self.block_size)
        B, rows = self.buckets[-1], (2 * MAX_STRIDE - 1) * self.buckets[-1]
        self.graphs = CudaGraphRunner(self._forward, self.device, 5 * B + 2 * rows + B * self.graph_width, capture=capture)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if not self.kernel_path:
            return self._execute_sdpa(build_step_batch(sched.items, self.mask_token_id))
        pad = graph_padding(sched.items, sched.num_tokens, self.buckets) if self.graphs else None
        if pad is not None and all(len(it.request.block_table) <= self.graph_width for it in sched.items):
            batch = build_step_batch(sched.items, self.mask_token_id, pad)
            shape = StepShape.of(batch, self.graph_width, self.cfg.num_kv_heads, self.device, self.max_model_len)
            if self.graphs.can_run(shape):
                (hidden, q_index), inputs = self.graphs.run(pack_step(batch, self.graph_width), shape)
                return self._logits(hidden, q_index, inputs[shape.packed_size :], batch)
        batch = build_step_batch(sched.items, self.mask_token_id)
        return self._execute_kernel(batch)

    def _execute_kernel(self, batch: StepBatch) -> RunnerOutput:
        if any(g > 1 for g in batch.groups):
            raise ValueError("draft_anchors: MASK groups per anchor need the SDPA attention path (IDLM_ATTENTION=torch)")
        width = max((len(t) for t in batch.tables), default=1) or 1
        shape = StepShape.of(batch, width, self.cfg.num_kv_heads, self.device)
        inputs = pack_step(batch, width).to(self.device, non_blocking=True)
        hidden, q_index = self._forward(inputs, shape)
        return self._logits(hidden, q_index, inputs[shape.packed_size :], batch)

    def _forward(self, inputs: torch.Tensor, shape: StepShape) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kernel path, packed inputs on the device -> (hidden [T, H], flat row of each request-order
        row or None). Host-sync free: this is what a CUDA graph captures."""
        meta, ids = KernelMetadata.build(inputs, shape, self.block_size)
        lora_from = shape.num_clean if self.use_lora_gate else None
        hidden = self.model(ids, meta.positions, kv_caches=self.kv_caches, meta=meta, lora_from=lora_from)
        return hidden, meta.q_index

    def _logits(self, hidden, q_index, logit_rows: torch.Tensor, batch: StepBatch) -> RunnerOutput:
        if batch.logit_rows:
            rows = logit_rows.long()  # [R] request-order rows, on the device
            if q_index is not None:
                rows = q_index[rows]
            logits = self.model.compute_logits(hidden.index_select(0, rows)).float()  # [R, V]
        else:
            logits = torch.empty(0, self.cfg.vocab_size, device=self.device)
        return self._with_prompt_hidden(RunnerOutput(logits=logits, row_offsets=batch.logit_offsets), hidden,
                                        q_index, batch)

    def _execute_sdpa(self, batch: StepBatch) -> RunnerOutput:
        dev = self.device
        q_lens = [c + m for c, m in zip(batch.c_real, batch.m_real)]
        row_of = None
        if not batch.in_request_order:
            row_of = _row_of(q_lens, batch.c_real, batch.num_clean)
        meta = AttentionMetadata.build(q_lens, batch.ctx, batch.tables, self.block_size, dev, row_of=row_of,
                                       clean_lens=batch.c_real, mask_groups=batch.groups,
                                       invariant=self.device.type == "cpu" and self.dtype != torch.float32)
        input_ids = torch.tensor(batch.ids, dtype=torch.long, device=dev)  # [T]
        # R-ISD: MASK rows are rows num_clean.. (possibly none this step; the LoRA layers then use the
        # same packed weights as on MASK steps, so only one packed copy of each weight exists)
        lora_from = batch.num_clean if self.use_lora_gate else None
        hidden = self.model(input_ids, meta.positions, kv_caches=self.kv_caches, meta=meta, lora_from=lora_from)  # [T, H]
        if batch.logit_rows:
            rows = torch.tensor(batch.logit_rows, dtype=torch.long)
            if row_of is not None:
                rows = row_of[rows]
            logits = self.model.compute_logits(hidden.index_select(0, rows.to(dev))).float()  # [R, V]
        else:
            logits = torch.empty(0, self.cfg.vocab_size, device=dev)
        return self._with_prompt_hidden(RunnerOutput(logits=logits, row_offsets=batch.logit_offsets), hidden,
                                        row_of, batch)

    @staticmethod
    def _with_prompt_hidden(out: RunnerOutput, hidden, row_of, batch: StepBatch) -> RunnerOutput:
        """Adds the hidden states of the prompt rows whose logprobs were asked for (`row_of` maps
        request-order rows to flat rows, None when they coincide)."""
        if batch.prompt_rows:
            rows = torch.tensor(batch.prompt_rows, dtype=torch.long, device=hidden.device)
            if row_of is not None:
                rows = row_of[rows]
            out.prompt_hidden, out.prompt_spans = hidden.index_select(0, rows), batch.prompt_spans
        return out


    @torch.inference_mode()
    def time_rows(self, rows: int, masks: int = 0, groups: int = 1) -> float:
        """Seconds of one eager forward of `rows` rows with logits at every row (a decode-like step),
        the last `masks` of them MASK rows (the gated LoRA's rows in R-ISD) in `groups` MASK groups
        (`draft_anchors="every"`: their attention masks). Writes only KV slots of free blocks."""
        rows = max(1, min(rows, self.kv_caches[0][0].shape[0]))
        blocks = list(range(-(-rows // self.block_size)))
        n_mask = min(masks, rows - 1)
        n_clean = rows - n_mask
        batch = StepBatch(ids=[0] * rows, ctx=[0], c_real=[n_clean], m_real=[n_mask], c_slot=[n_clean],
                          m_slot=[n_mask], groups=[max(1, min(groups, n_mask, n_clean))], tables=[blocks],
                          logit_rows=list(range(rows)), logit_offsets=[0])
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        if self.kernel_path:
            self._execute_kernel(batch)
        else:
            self._execute_sdpa(batch)
        sync()
        return time.perf_counter() - t0


def _row_of(q_lens: list[int], clean_lens: list[int], n_clean: int) -> torch.Tensor:
    """[T] flat row of each request-order row: request i's clean rows sit in the first part (in item
    order), its MASK rows in the second part, starting at `n_clean`."""
    ql = torch.tensor(q_lens, dtype=torch.long)
    cl = torch.tensor(clean_lens, dtype=torch.long)
    ml = ql - cl
    rid, j = request_index(ql, sum(q_lens))
    return flat_rows(rid, j, cl, ml, cl, ml, n_clean)
