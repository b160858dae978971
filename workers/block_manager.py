"""Paged KV-cache bookkeeping in pure Python (no torch): fixed-size blocks, a free list, per-request
block tables. Rolling back rejected drafts and MASK rows is just shrinking a request's valid
length and returning the blocks past it (`trim`).

Owns: `BlockManager`. Tested in milliseconds without a model.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing(self, table: list[int], num_tokens: int) -> int:
        """Blocks that must be added to `table` to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.num_missing(table, num_tokens) <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Appends free blocks to `table` (in place) so it holds `num_tokens` tokens."""
        need = self.num_missing(table, num_tokens)
        if need > len(self._free):
            raise MemoryError(f"KV cache: need {need} blocks, {len(self._free)} free")
        for _ in range(need):
            table.append(self._free.popleft())

    def trim(self, table: list[int], num_tokens: int) -> None:
        """Returns the blocks past the first `num_tokens` tokens to the free list (rollback)."""
        keep = self.blocks_for(num_tokens)
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, table: list[int]) -> None:
        self.trim(table, 0)
