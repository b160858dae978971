"""Load-adaptive ISD stride: each round, every decoding request gets a stride n in 1..N (DESIGN §1).

Owns: `StepCostModel` (step time against rows and MASK rows in the step: a forward-time curve
calibrated at start-up under a correction fitted online to measured whole steps),
`AcceptanceEstimator` (conditional acceptance per draft position: an engine-wide running estimate
that is the prior of every request's own running estimate), the steady-state round value
(`round_value`), and `StridePolicy.choose`, which picks the strides that maximise the expected
committed tokens per second of the whole step.

Why it is lossless: a round with stride n verifies the first n-1 of a request's drafts (a draft
sequence may be cut: the tail is dropped, never verified) and proposes n-1 new ones; every round is
still a speculative-sampling round, so greedy output is AR's and sampled output is AR-distributed
whatever the schedule of strides.

Value of a stride (the paper's TPF formula, with per-position acceptance): with conditional
acceptance a_j of draft j given drafts 0..j-1 accepted, P_k = a_0 ... a_{k-1} is the chance that
the first k drafts are accepted. A verify round with n-1 drafts commits 1 + P_1 + ... + P_{n-1}
tokens and stays in verify rounds with probability P_{n-1} (else a cold round, 1 token, follows),
so in the steady state
    tokens per round E(n) = (2 - P_{n-1} + P_1 + ... + P_{n-1}) / (2 - P_{n-1})
    rows per round   R(n) = n + (n - 1) / (2 - P_{n-1})     (cold rounds feed n rows, verify 2n-1)
(uniform a = p gives the paper's (2 + p + ... + p^(n-2)) / (2 - p^(n-1))). With a MASK group
after every real row (`draft_anchors="every"`, workers.isd) no round is cold: every round verifies
n-1 drafts and commits 1 + P_1 + ... + P_{n-1} tokens from n + n(n-1) = n^2 rows (n(n-1) MASK).
`choose` maximises
sum_i E_i(n_i) / t(rows_other + sum_i R_i(n_i), sum_i (n_i - 1) MASK rows) over the allocations a
price per row traces out
(each request maximises E_i(n) - mu * R_i(n); a grid of mu from 0 to "every request AR"), scored
exactly with t, so a non-convex cost curve (cheap rows up to a knee, then compute-bound) is
handled without a local linearisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from workers.draft_guard import DraftGuard


class StepCostModel:
    """Step time (seconds) against the rows in the step and how many of them are MASK rows: a
    calibrated forward-time curve `f` of clean rows (piecewise linear between measured points, the
    last segment extended) under a linear correction learnt online from whole steps,
        t(rows, masks) = overhead * f(1) + scale * f(rows) + lora_cost * [masks > 0] + mask_cost * masks.

    Why this shape: the start-up calibration times forwards alone, while a step also pays the
    scheduler, the sampler and the output processing, a cost nearly independent of rows. The policy
    only runs a few row counts, so a correction learnt point by point would stay wrong at the row
    counts it does not run (e.g. the 2N-1 rows of a stride it has not chosen yet), which it then
    could never come to prefer. An offset learnt anywhere applies everywhere. MASK rows cost more
    than clean rows: a step with any pays the gated LoRA's weight reads once (`lora_cost`: the
    GEMM against the weight with LoRA A under it, one small B product per projection, whatever
    the count at a few rows), and each one a little more (`mask_cost`). Both start at their
    calibrated values and are refitted from steps with and without MASK rows. `scale` (machine
    speed drift, row-dependent costs) is held near 1 by a strong prior and moves only when the
    steps span row counts (the policy's probes see to that). The fit is a ridge regression over
    exponentially forgotten observations (`forget` per step), so it follows the operating point."""

    def __init__(self, points: list[int], times: list[float], mask_cost: float = 0.0, lora_cost: float = 0.0,
                 forget: float = 0.97, overhead_prior_weight: float = 0.1, scale_prior_weight: float = 30.0,
                 mask_prior_weight: float = 0.3) -> None:
        if len(points) != len(times) or not points or any(b <= a for a, b in zip(points, points[1:])):
            raise ValueError("points: need ascending row counts, one time each")
        self.points = [int(p) for p in points]
        self.times = [float(t) for t in times]
        for i in range(1, len(self.times)):  # more rows never cost less
            self.times[i] = max(self.times[i], self.times[i - 1])
        self.forget = forget
        # features in seconds: [f(1), f(rows), f(1) * [masks > 0], f(1) * masks]
        u = self._unit = max(self.times[0], 1e-6)
        self._prior = np.array([0.0, 1.0, max(lora_cost, 0.0) / u, max(mask_cost, 0.0) / u])
        self._ridge = np.diag([overhead_prior_weight, scale_prior_weight, mask_prior_weight, mask_prior_weight]) * u * u
        self._S = np.zeros((4, 4))
        self._s = np.zeros(4)
        self.overhead, self.scale = 0.0, 1.0
        self.lora_cost, self.mask_cost = max(lora_cost, 0.0), max(mask_cost, 0.0)

    @classmethod
    def calibrate(cls, time_rows: Callable[..., float], max_rows: int, rounds: int = 2,
                  max_seconds: float = 0.3, masks: bool = False, block_rows: int = 7,
                  dense: int = 8, block_groups: int = 1) -> StepCostModel:
        """Times `time_rows(r)` (one forward of r clean rows, seconds) at every r up to `dense`,
        then 2x apart (16, 32, ...) up to `max_rows` (or until one forward takes `max_seconds`;
        beyond, the last slope is extended). Every small row count is its own point because the
        curve is not smooth there: the CPU GEMM can change backend between two row counts
        (workers.cpu_gemm: e.g. MKL up to 3 rows, oneDNN from 4). One untimed pass first (lazy
        weight packing, first touch of the KV pages), then `rounds` interleaved passes; each point
        keeps its minimum (timing noise only ever adds). `masks`: also time `block_rows`-row blocks
        with 1 and with `block_rows - 1` MASK rows (`time_rows(rows, masks)`) for the cost of a
        step with MASK rows and of each one; the engine passes its stride-2 block (3 rows with one
        MASK group after the last draft, 4 with a group per real row), the drafting step the
        policy weighs against AR most often. `block_groups` > 1 (the `every` layout's block: its
        MASK rows in groups, each with its own attention mask): the gated LoRA's step cost is
        taken from that block as the layout runs it (`time_rows(block_rows, block_groups,
        block_groups)`), so the groups' attention cost is in the model."""
        block = masks and 3 <= block_rows <= max_rows
        time_rows(1)  # warm-up: lazy weight packing (slow once), so it cannot end the sweep early
        if block:
            time_rows(block_rows, block_rows - 1)  # the same for the weights merged with LoRA A
        points, r = [], 1
        while r <= max_rows:
            points.append(r)
            if time_rows(r) > max_seconds:
                break
            r = r + 1 if r < dense else 2 * r
        if points[-1] < max_rows and r > max_rows and time_rows(max_rows) <= max_seconds:
            points.append(max_rows)
        grouped = block and block_groups > 1
        best, few, many, laid = [math.inf] * len(points), math.inf, math.inf, math.inf
        for _ in range(rounds):
            for i, p in enumerate(points):
                best[i] = min(best[i], time_rows(p))
            if block:
                few, many = min(few, time_rows(block_rows, 1)), min(many, time_rows(block_rows, block_rows - 1))
            if grouped:
                laid = min(laid, time_rows(block_rows, block_groups, block_groups))
        if not block:
            return cls(points, best)
        per_mask = max((many - few) / (block_rows - 2), 0.0)
        f_block = float(cls(points, best).forward_time(block_rows))
        lora = max((laid - block_groups * per_mask if grouped else few - per_mask) - f_block, 0.0)
        return cls(points, best, mask_cost=per_mask, lora_cost=lora)

    def forward_time(self, rows: np.ndarray | float) -> np.ndarray:
        """The calibrated curve f at `rows` (the last segment's slope beyond the last point)."""
        r = np.asarray(rows, dtype=float)
        p, t = self.points, self.times
        f = np.interp(r, p, t)
        if len(p) > 1:
            beyond = r > p[-1]
            f = np.where(beyond, t[-1] + (r - p[-1]) * (t[-1] - t[-2]) / (p[-1] - p[-2]), f)
        return f

    def predict_many(self, rows: np.ndarray, masks: np.ndarray | float = 0.0) -> np.ndarray:
        m = np.asarray(masks, dtype=float)
        t = (self.overhead * self._unit + self.scale * self.forward_time(rows) + self.lora_cost * (m > 0)
             + self.mask_cost * m)
        return np.maximum(t, 0.0)

    def predict(self, rows: float, masks: float = 0.0) -> float:
        """Seconds for a step of `rows` rows, `masks` of them MASK rows."""
        return float(self.predict_many(np.asarray([rows]), masks)[0])

    def slope(self, rows: float) -> float:
        """dt/drows at `rows` (clean rows)."""
        return float(self.scale * (self.forward_time(rows + 0.5) - self.forward_time(max(rows - 0.5, 0.0))))

    def observe(self, rows: int, seconds: float, masks: int = 0) -> None:
        """One measured step: refits (overhead, scale, lora_cost, mask_cost) to the forgotten
        observations and the prior."""
        u = self._unit
        x = np.array([u, float(self.forward_time(rows)), u * (masks > 0), masks * u])
        self._S = self.forget * self._S + np.outer(x, x)
        self._s = self.forget * self._s + x * seconds
        theta = np.linalg.solve(self._S + self._ridge, self._s + self._ridge @ self._prior)
        self.overhead, self.scale = float(theta[0]), max(float(theta[1]), 0.05)
        self.lora_cost, self.mask_cost = max(float(theta[2]) * u, 0.0), max(float(theta[3]) * u, 0.0)


class AcceptanceEstimator:
    """Conditional acceptance per draft position. Engine-wide: exponentially weighted counts over all
    requests (`engine_decay` per observation). Per request: its own weighted counts, shrunk toward
    the engine-wide estimate with `prior_weight` pseudo-observations, so a new request starts at the
    engine's figure and moves to its own as it verifies drafts."""

    def __init__(self, max_drafts: int, prior: float = 0.5, prior_weight: float = 4.0,
                 request_decay: float = 0.9, engine_decay: float = 0.998) -> None:
        self.max_drafts = max_drafts
        self.prior_weight = prior_weight
        self.request_decay = request_decay
        self.engine_decay = engine_decay
        self.tried = [prior_weight] * max_drafts  # engine-wide weighted counts, seeded by the prior
        self.hits = [prior * prior_weight] * max_drafts

    def engine_rates(self) -> list[float]:
        return [h / t for h, t in zip(self.hits, self.tried)]

    def observe(self, state: list[list[float]], num_verified: int, num_accepted: int) -> None:
        """A verify round of one request: drafts 0..num_verified-1 were checked in order until the
        first rejection, so position j was tried iff j <= num_accepted (and j < num_verified)."""
        tried, hits = state
        for j in range(min(num_verified, num_accepted + 1, self.max_drafts)):
            ok = 1.0 if j < num_accepted else 0.0
            tried[j] = self.request_decay * tried[j] + 1.0
            hits[j] = self.request_decay * hits[j] + ok
            self.tried[j] = self.engine_decay * self.tried[j] + 1.0
            self.hits[j] = self.engine_decay * self.hits[j] + ok

    def age(self, state: list[list[float]]) -> None:
        """A round of the request without drafts (stride 1): its own evidence fades by
        `request_decay`, so its estimate returns to the engine-wide one. Without this, a request
        put on AR by a run of rejections has no way to learn that its text got easier again (no
        drafts, no evidence) and stays AR until a probe picks it."""
        tried, hits = state
        for j in range(len(tried)):
            tried[j] *= self.request_decay
            hits[j] *= self.request_decay

    def new_state(self) -> list[list[float]]:
        return [[0.0] * self.max_drafts, [0.0] * self.max_drafts]

    def rates(self, state: list[list[float]]) -> list[float]:
        w = self.prior_weight
        return [(h + w * e) / (t + w) for h, t, e in zip(state[1], state[0], self.engine_rates())]


def round_value(rates: list[float], n: int) -> tuple[float, float]:
    """(tokens per round, rows per round) in the steady state of stride n (module docstring)."""
    if n <= 1:
        return 1.0, 1.0
    P, cum = 1.0, 0.0
    for a in rates[: n - 1]:
        P *= a
        cum += P
    d = 2.0 - P
    return (d + cum) / d, n + (n - 1) / d


# Prices (tokens given up per extra row) tried by `StridePolicy.choose`: 0 (most tokens per
# round), a log grid, and one above any stride's marginal value (every request AR).
_PRICES = np.concatenate([[0.0], np.geomspace(1e-3, 2.0, 40), [1e6]])


def value_table(rates: list[float], max_stride: int, every_anchor: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """E(n), R(n) for n = 1..max_stride: two arrays [max_stride] (module docstring)."""
    e, r = value_tables(np.asarray([rates[: max_stride - 1]], dtype=float).reshape(1, -1), max_stride, every_anchor)
    return e[0], r[0]


def value_tables(rates: np.ndarray, max_stride: int, every_anchor: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`value_table` of K requests at once: rates [K, >= max_stride - 1] -> E, R [K, max_stride].
    (One call per step instead of one per request: the choice runs every step, at C = 64 too.)"""
    K = rates.shape[0]
    P = np.cumprod(rates[:, : max_stride - 1], axis=1)  # [K, N-1] P_1 .. P_{N-1}
    cum = np.cumsum(P, axis=1)
    e, r = np.ones((K, max_stride)), np.ones((K, max_stride))
    n = np.arange(2, max_stride + 1, dtype=float)  # [N-1]
    if every_anchor:
        e[:, 1:], r[:, 1:] = 1.0 + cum, n * n
    else:
        d = 2.0 - P
        e[:, 1:], r[:, 1:] = (d + cum) / d, n + (n - 1) / d
    return e, r


def mask_rows(max_stride: int, every_anchor: bool = False) -> np.ndarray:
    """MASK rows of a round at stride n = 1..max_stride: [max_stride]."""
    n = np.arange(1, max_stride + 1, dtype=float)
    return n * (n - 1) if every_anchor else n - 1


class StridePolicy:
    """Chooses each decoding request's stride for the coming step (fixed N when not adaptive)."""

    def __init__(self, max_stride: int, adaptive: bool, cost: StepCostModel | None = None,
                 acceptance: AcceptanceEstimator | None = None, probe_every: int = 16,
                 probe_requests: int = 4, every_anchor: bool = False, guard: DraftGuard | None = None) -> None:
        self.max_stride = max_stride
        self.every_anchor = every_anchor
        """Verify rounds carry a MASK group per real row (no cold rounds): `value_table`'s other form."""
        self.adaptive = adaptive and max_stride > 1
        self.cost = cost
        self.acceptance = acceptance or AcceptanceEstimator(max(max_stride - 1, 1))
        self.guard = guard if self.adaptive else None
        """Measured check of the choice (workers.draft_guard): at a load where the policy's drafting
        is measured slower than running every request AR, the guard runs AR and the policy is not
        consulted (no choice, no probes)."""
        # Exploration: the cost model only learns at the row counts it runs, and acceptance only
        # where drafts are verified. Every `probe_every` steps the choice is perturbed, down and up
        # in turn: down, an AR step when it chose drafting (not with a guard, whose AR epochs
        # show the model the AR steps); up, one stride longer for up to
        # `probe_requests` requests (the rows of a stride it does not run, which it could
        # otherwise never learn are cheap). An up-probe is skipped when even every one of its
        # drafts accepted would not beat the choice under the cost model (rows too dear at this
        # load): such a probe cannot change a later choice, only cost its MASK rows.
        self.probe_every = probe_every
        self.probe_requests = probe_requests
        self._calls = 0
        # An up-probe's drafts are only verified if the request keeps a stride that long on the
        # next step (a shorter stride cuts them): without this hold a probe from all-AR paid for
        # its MASK rows and never saw one draft verified, so acceptance could not recover.
        # Keyed by the identity of the request's acceptance state (one list per request).
        self._hold: dict[int, int] = {}

    def _best(self, rates: list[list[float]], counted: int, other_rows: int) -> list[int]:
        """The best strides (tokens per second of the step) for requests with these per-position
        rates; only the first `counted` count in the step (a further one is scored alone)."""
        N = self.max_stride
        E, R = self._tables(rates)  # [K, N]
        M = np.broadcast_to(mask_rows(N, self.every_anchor), E.shape)  # MASK rows at stride n
        # Each price mu per row gives one allocation (every request maximises E - mu*R: a point of
        # its convex hull); the allocation with the best exact tokens/second over the grid wins.
        choice = np.argmax(E[None] - _PRICES[:, None, None] * R[None], axis=2)  # [G, K]
        cols = np.arange(len(rates))[None]
        rows = other_rows + R[cols, choice][:, :counted].sum(1)  # [G]
        tokens = E[cols, choice][:, :counted].sum(1)
        masks = M[cols, choice][:, :counted].sum(1)
        t = self.cost.predict_many(rows, masks)
        return (choice[int(np.argmax(tokens / np.maximum(t, 1e-9)))] + 1).tolist()

    def _tables(self, rates: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
        return value_tables(np.asarray(rates, dtype=float).reshape(len(rates), -1), self.max_stride, self.every_anchor)

    def _rate(self, rates: list[list[float]], strides: list[int], other_rows: int) -> float:
        """Expected tokens per second of a step with these strides (the cost model's time)."""
        N = self.max_stride
        E, R = self._tables(rates)
        i, n = np.arange(len(strides)), np.asarray(strides) - 1
        t = self.cost.predict(other_rows + R[i, n].sum(), mask_rows(N, self.every_anchor)[n].sum())
        return float(E[i, n].sum() / max(t, 1e-9))

    def choose(self, states: list[list[list[float]]], other_rows: int = 0, pending: int = 0) -> tuple[list[int], int]:
        """Strides for requests with acceptance states `states`, plus the stride a newly admitted
        request starts with; `other_rows`: rows of prefill chunks expected in the same step;
        `pending`: requests in prefill that decode soon. A new request's stride is the choice for
        the next step's load: the decoding requests plus the pending ones at the engine-wide
        estimate (without them, a wave of new requests would all start at the stride that is
        best for one request alone)."""
        N = self.max_stride
        if not self.adaptive or self.cost is None:
            return [N] * len(states), N
        if states and self.guard is not None and not self.guard.begin_step(len(states)):
            self._hold = {}  # a probe's hold ends with the policy's epoch
            return [1] * len(states), 1
        engine = self.acceptance.engine_rates()
        own = [self.acceptance.rates(s) for s in states]
        strides = self._best(own + [engine], len(states), other_rows)
        new = strides[-1]
        if pending:
            new = self._best(own + [engine] * pending, len(states) + pending, 0)[-1]
        strides, B = strides[: len(states)], len(states)
        if self._hold:
            for i, s in enumerate(states):
                strides[i] = max(strides[i], self._hold.get(id(s), 0))
            self._hold = {}
        self._calls += 1
        # Probing from an all-AR choice is the dearer kind (a step that pays the gated LoRA for
        # drafts that are then cut) and the rarer need (the load that made AR best changes
        # slowly), so it comes 4x less often.
        period = self.probe_every * (1 if any(n > 1 for n in strides[:B]) else 4)
        if self.probe_every and B and self._calls % period == 0:
            k = self._calls // self.probe_every
            longer = [i for i in range(B) if strides[i] < N]
            if k % 2 == 0 and any(n > 1 for n in strides[:B]):
                # A down-probe (one AR step) shows the cost model the AR step at this load. With
                # the guard its AR epochs do that (their steps refine the same model), and a lone
                # AR step is dear in ISD: it cuts every draft, so the next round verifies none.
                if self.guard is None:
                    strides[:B] = [1] * B
            elif longer:
                picked = [longer[(k + j) % len(longer)] for j in range(min(len(longer), self.probe_requests))]
                up = list(strides[:B])
                for i in picked:
                    up[i] += 1
                # Only a probe that could pay: with its requests' drafts all accepted, the longer
                # strides must beat the choice under the cost model. At a load where rows are dear
                # (C = 16, 64 on a CPU) almost none can, and those probes were ~1-2% of the step time.
                best_case = [[1.0] * len(own[i]) if i in picked else own[i] for i in range(B)]
                if self._rate(best_case, up, other_rows) > self._rate(own, strides[:B], other_rows):
                    strides[:B] = up
                    for i in picked:
                        self._hold[id(states[i])] = strides[i]
        return strides, new
