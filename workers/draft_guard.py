"""Measured guard of the adaptive stride: drafting runs only at the loads where it is measured faster.

Owns: `DraftGuard`, which splits decode steps into epochs and, per load level (decoding requests,
bucketed), runs each epoch either with the stride policy's choice (`policy`: drafting where the cost
model says it pays) or with every request at stride 1 (`ar`), keeps the realised committed tokens per
second of both arms, and runs the faster one, trying the other now and then.

Why: the policy (workers.stride) picks strides from a modelled step time and estimated acceptance.
Where drafting wins clearly (one request on a CPU: 1.15-1.3x) the model is good enough; near a
tie (four requests on this CPU: 16 rows with the gated LoRA against 4) the model's few-percent
errors decide, and drafting chosen there cost 8% wall time (bench/engine.py at C = 4). The guard
judges by the outcome users see, tokens per second of whole steps, so ISD is never slower than AR
for long: a wrong arm is measured and left. It changes nothing but strides, and every schedule of
strides is exact (greedy = AR, sampled output AR-distributed).

Fair measurement:
- Only steps with no prefill rows count (a prefill's cost does not depend on the arm).
- An epoch is `epoch_steps` counted steps at one load level. A switch to `policy` pays its first
  drafting step with nothing yet to verify, and a switch away drops the drafts in flight; both
  stay in the arm that caused them, so an explored arm is judged with its switching costs
  (conservative toward the incumbent, never toward drafting by accident).
- The rates are decayed sums per arm (`decay` per epoch's worth of steps): the incumbent's is an
  average of its recent epochs, the explored one's mostly its latest epoch.

Exploration: after `patience` epochs of the incumbent, one epoch of the other arm. If it loses,
`patience` doubles (quadruples for a loss of 10% or more, beyond an epoch's timing noise), up to
`max_patience`; if it wins, it becomes the incumbent and `patience` resets. So a losing arm costs
~1/patience of the steps, falling to ~1/max_patience, and a change of workload (say, text whose
drafts are accepted more) is found within max_patience epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ARMS = ("policy", "ar")


def load_bucket(load: int) -> int:
    """Load levels that share measurements: 1, 2, 3, 4 exact, then 6, 8, 12, 16, 24, 32, ...
    (each bucket named by its largest load)."""
    if load <= 4:
        return max(load, 1)
    b = 4
    while b < load:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


@dataclass
class _Level:
    """What the guard knows at one load level, and that level's current epoch (an epoch interrupted
    by another load level resumes when the load comes back)."""

    tokens: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ARMS, 0.0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ARMS, 0.0))
    epochs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ARMS, 0))
    best: str = "policy"
    patience: int = 1
    run: int = 0
    """Epochs of `best` since the last exploration."""
    # the current epoch
    arm: str = "policy"
    exploring: bool = False
    left: int = 0
    """Counted steps still to run in this epoch."""
    acc_tokens: float = 0.0
    acc_seconds: float = 0.0
    acc_steps: int = 0

    def rate(self, arm: str) -> float:
        return self.tokens[arm] / self.seconds[arm] if self.seconds[arm] > 0 else 0.0


class DraftGuard:
    """Per load level, the arm (`policy` or `ar`) with the higher measured committed tokens per
    second over decode-only steps (module docstring). Driven by the engine's step loop:
    `begin_step` from the stride policy before its choice, `end_step` after the step commits."""

    def __init__(self, epoch_steps: int = 16, min_patience: int = 2, max_patience: int = 32,
                 decay: float = 0.5) -> None:
        if epoch_steps < 1 or not 1 <= min_patience <= max_patience or not 0.0 < decay <= 1.0:
            raise ValueError("DraftGuard: need epoch_steps >= 1, 1 <= min_patience <= max_patience, 0 < decay <= 1")
        self.epoch_steps = epoch_steps
        self.min_patience = min_patience
        self.max_patience = max_patience
        self.decay = decay
        self.levels: dict[int, _Level] = {}
        self.steps_by_arm = dict.fromkeys(ARMS, 0)
        """Counted steps run under each arm (cumulative; the `idlm_stride_guard_steps` counter)."""
        self._current: _Level | None = None

    # -- per step ----------------------------------------------------------------------------
    def begin_step(self, load: int) -> bool:
        """Called before the policy's choice with the number of decoding requests; True: let the
        policy choose the strides, False: run every request at stride 1 this step."""
        key = load_bucket(load)
        lv = self.levels.get(key)
        if lv is None:
            lv = self.levels[key] = _Level(patience=self.min_patience)
        if lv.left <= 0:
            self._close_epoch(lv)
            self._open_epoch(lv)
        self._current = lv
        return lv.arm == "policy"

    def end_step(self, tokens: int, seconds: float, counted: bool) -> None:
        """The step's committed tokens and duration; `counted`: a decode-only step (no prefill rows)."""
        lv, self._current = self._current, None
        if not counted or lv is None:
            return
        lv.acc_tokens += tokens
        lv.acc_seconds += seconds
        lv.acc_steps += 1
        lv.left -= 1
        self.steps_by_arm[lv.arm] += 1

    @property
    def forcing_ar(self) -> bool:
        """True while this step runs every request at stride 1 by the guard's choice (its stride-1
        rounds are no evidence about a request's acceptance)."""
        return self._current is not None and self._current.arm == "ar"

    # -- epochs ------------------------------------------------------------------------------
    def _open_epoch(self, lv: _Level) -> None:
        lv.left, lv.exploring = self.epoch_steps, False
        if lv.epochs["policy"] == 0:
            lv.arm = "policy"  # first, what the cost model says
        elif lv.epochs["ar"] == 0 or lv.run >= lv.patience:
            lv.arm, lv.exploring = _other(lv.best), True
        else:
            lv.arm = lv.best

    def _close_epoch(self, lv: _Level) -> None:
        steps, arm = lv.acc_steps, lv.arm
        if steps == 0:
            return
        d = self.decay ** (steps / self.epoch_steps)
        lv.tokens[arm] = d * lv.tokens[arm] + lv.acc_tokens
        lv.seconds[arm] = d * lv.seconds[arm] + lv.acc_seconds
        lv.epochs[arm] += 1
        lv.acc_tokens, lv.acc_seconds, lv.acc_steps = 0.0, 0.0, 0
        if not lv.exploring:
            lv.run += 1
            return
        # an exploration's verdict: the faster arm is the incumbent; one that keeps losing is
        # tried less and less often
        lv.run = 0
        other = _other(arm)
        better = arm if lv.rate(arm) > lv.rate(other) else other
        if better != lv.best:
            lv.best, lv.patience = better, self.min_patience
        else:
            # a clear loser (by 10% or more: beyond the step-time noise of an epoch) is retried 4x
            # less often after each loss, a near-tie 2x
            worse = min(lv.rate(arm), lv.rate(other)) / max(lv.rate(arm), lv.rate(other), 1e-12)
            lv.patience = min((4 if worse <= 0.9 else 2) * lv.patience, self.max_patience)

    def summary(self) -> dict[int, dict]:
        """Per load level: measured tokens/s of each arm, epochs, the incumbent (bench and debugging)."""
        return {k: {"rate": {a: lv.rate(a) for a in ARMS}, "epochs": dict(lv.epochs), "best": lv.best,
                    "patience": lv.patience} for k, lv in sorted(self.levels.items())}


def _other(arm: str) -> str:
    return "ar" if arm == "policy" else "policy"
