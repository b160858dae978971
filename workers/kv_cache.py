"""KV tensors of the paged cache: one (K, V) pair per layer, each `[num_blocks * block_size, Hkv, D]`,
addressed by slot = block_id * block_size + offset (see `workers.attention`).

Owns: allocation of the cache tensors from the engine config and the model shape.
"""

from __future__ import annotations

import torch

from workers.models.config import ModelConfig


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str | torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    slots = num_blocks * block_size
    shape = (slots, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]


def kv_cache_bytes(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_layers * num_blocks * block_size * cfg.num_kv_heads * cfg.head_dim * elem
