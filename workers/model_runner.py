"""Model runner: turns a `SchedulerOutput` into one forward over a ragged flat batch.

Owns: the model, its KV cache tensors, and input preparation. Every scheduled request contributes
its rows `[real tokens..., drafts..., MASK x m]` at consecutive positions after its cached prefix;
the runner returns logits only at the rows that need them (for a final item: `pending`, the drafts
and the MASK rows, which are contiguous at the end of its block).

Style rule (as vLLM's V2 runner): this file holds the common path only; feature code lives in the
decoder or the model.
"""

from __future__ import annotations

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
        ids: list[int] = []
        positions: list[int] = []
        lora: list[bool] = []
        logit_rows: list[int] = []
        row_offsets: list[int] = []
        q_lens, ctx_lens, tables = [], [], []
        start = 0
        for it in sched.items:
            req = it.request
            real = req.all_token_ids[req.num_computed : req.num_computed + it.num_real]
            block = real + (req.drafts[: it.num_drafts] if it.final else [])
            block += [self.mask_token_id] * it.num_masks if it.final else []
            ids += block
            positions += range(req.num_computed, req.num_computed + len(block))
            lora += [False] * (len(block) - it.num_masks) + [True] * it.num_masks
            if it.final:
                row_offsets.append(len(logit_rows))
                # `pending` is the last real row; it and everything after it need logits.
                first = start + it.num_real - 1
                logit_rows += range(first, start + len(block))
            else:
                row_offsets.append(-1)
            q_lens.append(len(block))
            ctx_lens.append(req.num_computed)
            tables.append(req.block_table)
            start += len(block)
        dev = self.device
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, self.block_size, dev)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)  # [T]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)  # [T]
        lora_mask = torch.tensor(lora, dtype=torch.bool, device=dev) if self.use_lora_gate else None
        hidden = self.model(input_ids, pos, kv_caches=self.kv_caches, meta=meta, lora_mask=lora_mask)  # [T, H]
        if logit_rows:
            rows = torch.tensor(logit_rows, dtype=torch.long, device=dev)
            logits = self.model.compute_logits(hidden.index_select(0, rows)).float()  # [R, V]
        else:
            logits = torch.empty(0, self.cfg.vocab_size, device=dev)
        return RunnerOutput(logits=logits, row_offsets=row_offsets)
