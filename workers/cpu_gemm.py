"""The CPU GEMM backend per row count, measured on the machine the engine starts on.

Owns: `choose_torch_rows`, which times the engine's own forward at 1, 2, 3, ... rows with oneDNN's
packed product and with `F.linear` (MKL), and `apply_torch_rows`, which sets the row counts that run
on `F.linear` on every linear layer of a model (`LoRALinear.torch_rows`).

Why: which is faster at a few rows depends on the CPU. On the AMD EPYC these benchmarks were first
run on, oneDNN's packed weights were faster at every row count; on an Intel Xeon (Sapphire Rapids)
MKL's 1-3-row path is 20-50% faster per layer (SmolLM2's projections, 1 row: qkv 18 vs 27 us, down
33 vs 72 us) and the AR step at C = 1 ran 17% faster on it, while from 4 rows oneDNN wins (C = 4:
76 vs 64 tokens/s). A fixed choice leaves one of those on the table; a measurement at start-up does
not. Only whole forwards are timed (what a step pays, caches included), and `F.linear` is taken
only where it is clearly faster (`margin`), so the choice does not flip between starts on noise.
The choice stops at the first row count where oneDNN wins (it wins from there on: its packed
layout pays more the more rows share it).

Exactness is unaffected: each row count uses one backend for every product of the step, so a
step's clean rows stay bitwise the base product at that row count (R-ISD), and which backend a
row count uses changes only rounding, as the row count itself does (DESIGN §1, batch variance).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from workers.models.linear import LoRALinear


def apply_torch_rows(model: nn.Module, rows: frozenset[int]) -> None:
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.torch_rows = rows


def choose_torch_rows(time_rows: Callable[[int], float], apply: Callable[[frozenset[int]], None],
                      max_rows: int = 8, rounds: int = 3, margin: float = 0.9) -> frozenset[int]:
    """Row counts 1..max_rows (from 1 up, until oneDNN wins) where a forward on `F.linear` takes
    less than `margin` times the oneDNN one; `time_rows(m)`: seconds of one forward of m rows.
    Leaves the choice applied."""
    chosen: set[int] = set()
    for m in range(1, max_rows + 1):
        best = {"onednn": float("inf"), "torch": float("inf")}
        for r in range(rounds + 1):  # the first pass packs weights / warms caches: not counted
            for backend in ("onednn", "torch") if r % 2 else ("torch", "onednn"):
                apply(frozenset(chosen | {m}) if backend == "torch" else frozenset(chosen))
                t = time_rows(m)
                if r:
                    best[backend] = min(best[backend], t)
        if best["torch"] >= margin * best["onednn"]:
            break
        chosen.add(m)
    rows = frozenset(chosen)
    apply(rows)
    return rows
