"""The `auto` draft layout (`EngineConfig.draft_anchors`), chosen at start from the calibrated
step costs of the machine the engine runs on.

Owns: `layout_rate` (a layout's best expected tokens per second for one request: the policy's
own value tables and cost model) and `choose_layout`, which calibrates the cost model once per
candidate stride-2 block and keeps the layout (and its model) that `layout_rate` prefers.

Why measured: `every` (a MASK group after each real row) commits more per round, `last` (one
group) feeds fewer rows; which pays depends on how step time grows with rows, which depends on
the CPU. On the AMD EPYC of the early runs a 4-row block cost 1.09x an AR step and `every` was
worth its rows; on an Intel Xeon SPR the 4-row block leaves MKL's cheap 1-3-row path
(workers.cpu_gemm) and costs 1.57x, so `every` ran R-ISD at 0.98x AR at C = 1 while `last` (its
stride-2 block is 3 rows) gave 1.06x (docs/benchmarks.md, item 11). The choice is made at one
request, the load where drafting pays most; at higher loads the policy runs mostly AR, where the
two layouts are the same step. Lossless either way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from workers.stride import StepCostModel, mask_rows, value_table


def layout_rate(cost: StepCostModel, max_stride: int, every_anchor: bool, rates: list[float]) -> float:
    """Best expected tokens/s over strides 1..max_stride of one request with per-position
    acceptance `rates` under this layout (steady state: `workers.stride.value_table`)."""
    e, r = value_table(rates, max_stride, every_anchor)
    t = cost.predict_many(r, mask_rows(max_stride, every_anchor))
    return float(np.max(e / np.maximum(t, 1e-12)))


def choose_layout(time_rows: Callable[..., float], max_rows: Callable[[bool], int], max_stride: int,
                  rates: list[float]) -> tuple[bool, StepCostModel]:
    """(every_anchor, its cost model): calibrates at each layout's stride-2 block (3 rows with one
    MASK group, 4 with a group per real row) and keeps the faster layout for one request at
    acceptance `rates`; a tie keeps `every` (no cold rounds). `max_rows(every)`: the calibration's
    row range for that layout."""
    last = StepCostModel.calibrate(time_rows, max_rows(False), masks=True, block_rows=3)
    every = StepCostModel.calibrate(time_rows, max_rows(True), masks=True, block_rows=4)
    if layout_rate(every, max_stride, True, rates) >= layout_rate(last, max_stride, False, rates):
        return True, every
    return False, last
