"""The engine's start-up step-cost calibration and its `auto` draft layout
(`EngineConfig.draft_anchors`).

Owns: `startup_costs` (the stride policy's cost model, calibrated at the layout's stride-2 block)
and `auto_every_anchor` (the `auto` layout on the SDPA path with the adaptive stride).

Why `auto` follows the CPU GEMM's row split: `every` (a MASK group after each real row) commits
more per round, `last` (one group) feeds fewer rows, and which pays depends on how a step's time
grows from 3 rows (`last`'s stride-2 block) to 4 (`every`'s). On the AMD EPYC of the early runs
oneDNN ran every row count, a 4-row block cost 1.09x an AR step and `every` was worth its rows
(TPF 1.47 vs 1.34). On an Intel Xeon SPR `F.linear`'s small-row path is the fastest to 3 rows and
a packed GEMM from 4 (workers.cpu_gemm), so the 4-row block costs 1.42-1.57x an AR step against
1.26-1.33x for 3 rows: there `every` ran adaptive R-ISD at 0.98x AR at C = 1 and `last` at 1.06x
(docs/benchmarks.md, items 11-12).
A comparison of the two layouts under the calibrated cost model was tried first and measured a
coin flip (predicted tokens/s within 1% either way) where the engines differ by 8%: the model
has neither the layouts' different acceptance (P_1 0.51 with `every`, 0.59 with `last` on the
demo adapter) nor the groups' attention cost at real context lengths. The GEMM split is measured
at start (workers.cpu_gemm: a 3% margin, probing past one noisy probe), so the choice is stable
between starts. Lossless either way.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.config import EngineConfig
from workers.stride import StepCostModel


def auto_every_anchor(gemm_rows: dict[int, str] | None) -> bool:
    """`auto` on the SDPA path: `last` where the CPU GEMM runs 3-row and 4-row products on different
    backends (`gemm_rows`: workers.cpu_gemm; the 3-row one on a small-row path, so the 4-row block
    costs a step up), else `every`."""
    rows = gemm_rows or {}
    return rows.get(3, "onednn") == rows.get(4, "onednn")


def startup_costs(config: EngineConfig, time_rows: Callable[..., float], every_anchor: bool,
                  gemm_rows: dict[int, str] | None) -> tuple[bool, StepCostModel | None]:
    """(every_anchor, cost model) for an engine: `every_anchor` as configured (True on the SDPA path
    under `auto`), turned to `last` by `auto_every_anchor` with the adaptive stride; the model
    (None without the adaptive stride) calibrated at the layout's stride-2 block."""
    if not (config.adaptive_stride and config.stride > 1):
        return every_anchor, None
    if every_anchor and config.draft_anchors == "auto":
        every_anchor = auto_every_anchor(gemm_rows)
    block = config.stride ** 2 if every_anchor else 2 * config.stride - 1
    max_rows = max(1, min(config.max_num_batched_tokens, config.max_num_seqs * block, config.num_blocks * config.kv_block_size))
    return every_anchor, StepCostModel.calibrate(time_rows, max_rows, masks=True, block_rows=4 if every_anchor else 3,
                                                 block_groups=2 if every_anchor else 1)
