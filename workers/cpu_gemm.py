"""The CPU GEMM backend per row count, measured on the machine the engine starts on.

Owns: `choose_gemm_rows`, which times the engine's own forward at 1, 2, 3, ... rows with oneDNN's
packed product, MKL's packed sgemm and `F.linear` (MKL unpacked), and `apply_gemm_rows`, which sets
the backend per row count on every linear layer of a model (`LoRALinear.gemm_rows`).

Why: which is faster at a given row count depends on the CPU. On the AMD EPYC these benchmarks
were first run on, oneDNN's packed weights were faster at every row count; on an Intel Xeon
(Sapphire Rapids) MKL is faster from 1 row up to ~16-24 (SmolLM2's products of a whole forward,
bench/cpu_gemm.py: 1 row 21.3 vs 28.2 ms, 4 rows 25.8 vs 29.0, 16 rows 35.9 vs 39.2), and oneDNN
wins from ~32 (prefill chunks, large batches). Within MKL, the unpacked `F.linear` was the faster
at 1-3 rows of an engine step (its small-M kernel; and an R-ISD step there computes x @ A^T as its
own small product, cheaper than the merged [W; A] GEMM at those counts), the packed one from 4.
A fixed choice leaves some of that on the table; a measurement at start-up does not. Only whole
forwards are timed (what a step pays, caches included), and a challenger of oneDNN is taken only
where it is faster by `margin`. Row counts are probed on a grid (`ROW_GRID`) until oneDNN wins
twice in a row (it wins from there on: its blocked layout pays more the more rows share it); a
challenger far behind oneDNN at one probe is not timed at the larger ones (start-up time).

Exactness is unaffected: each row count uses one backend for every product of the step, so a
step's clean rows stay bitwise the base product at that row count (R-ISD), and which backend a
row count uses changes only rounding, as the row count itself does (DESIGN §1, batch variance).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from workers.models.linear import LoRALinear

ROW_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
CHALLENGERS = ("mkl", "torch")
"""The backends tried against oneDNN (the default at any row count not probed or not won)."""


def apply_gemm_rows(model: nn.Module, rows: dict[int, str]) -> None:
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.gemm_rows = rows


def choose_gemm_rows(time_rows: Callable[[int], float], apply: Callable[[dict[int, str]], None],
                     grid: tuple[int, ...] = ROW_GRID, rounds: int = 3, margin: float = 0.97,
                     drop: float = 1.1) -> dict[int, str]:
    """{row count: "mkl" | "torch"} from probes at the row counts of `grid`: at each, the faster
    challenger if it takes less than `margin` times oneDNN's time, else oneDNN; the counts between
    two probes take the upper probe's backend, counts past the last probe oneDNN. Probing stops
    after two probes in a row that oneDNN won (one such probe may be noise: a 2-core VM's timings
    move by a few percent, about the gaps near the crossover); a challenger slower than oneDNN by
    `drop` at a probe is not timed at larger counts (it only falls further behind, and the probes
    are start-up time: ~7 s for SmolLM2 with all three timed throughout). `time_rows(m)`: seconds
    of one forward of m rows. Leaves the choice applied."""
    chosen: dict[int, str] = {}
    alive = list(CHALLENGERS)
    prev, lost = 0, 0
    for m in grid:
        if not alive:
            break
        backends = ("onednn", *alive)
        best = dict.fromkeys(backends, float("inf"))
        for r in range(rounds + 1):  # the first pass packs weights / warms caches: not counted
            for backend in backends if r % 2 else backends[::-1]:
                apply(chosen | {m: backend} if backend != "onednn" else dict(chosen))
                t = time_rows(m)
                if r:
                    best[backend] = min(best[backend], t)
        winner = min(alive, key=best.__getitem__)
        if best[winner] < margin * best["onednn"]:
            chosen.update(dict.fromkeys(range(prev + 1, m + 1), winner))
            lost = 0
        else:
            lost += 1
            if lost == 2:
                break
        alive = [c for c in alive if best[c] <= drop * best["onednn"]]
        prev = m
    apply(chosen)
    return chosen
