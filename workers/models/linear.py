"""Linear layers of the engine's models: fused projections with a gated LoRA per slice, and the CPU
GEMM backends that make small blocks cheap.

Owns: `LoRALinear` (one weight whose output rows are named slices, e.g. `q_proj`, `k_proj`, `v_proj`
of a fused `qkv_proj`, each with an optional low-rank delta applied only at selected rows) and the
choice of GEMM for its base product.

Why GEMM backends: on x86 CPUs torch's `F.linear` calls MKL's sgemm, which re-packs the weight every
call: its small-M path costs a 7-row block ~1.3-2x a 1-row product. Two libraries read a weight
packed once instead, and each wins on part of the row range (workers.cpu_gemm measures where):
- oneDNN's linear with the weight reordered into its blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`): a 7-row product costs about what one row does; best
  at many rows (prefill, large batches).
- MKL's packed sgemm (`torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`, what Inductor's
  freezing uses for fp32): on an Intel Xeon (SPR) 3-6% faster than oneDNN at 4-16 rows and far
  faster than `F.linear` there (bench/cpu_gemm.py). torch's op takes the packed path only when the
  input has the row count the weight was packed for, so the engine packs once (at `MKL_PACK_ROWS`)
  and passes each input's own row count: MKL's packed layout does not depend on that count (every
  pack has the same size, and packs built for 3 and for 16 rows give bit-identical products at
  2-33 rows, each equal to `F.linear` to rounding; tests/workers/test_cpu_gemm.py checks this build).
Packed copies are built lazily, the first time a frozen weight meets an input that needs no
gradient, and rebuilt when the weight changes. `IDLM_CPU_GEMM=onednn|mkl|torch` forces one backend
(`torch`: `F.linear`); CUDA always uses `F.linear` (cuBLAS).

Gated LoRA, fused: the slices' A matrices are stacked (`[S*r, in]`, on CPU packed under the base
weight so the base product and every row's x @ A^T are one GEMM) and their B matrices placed on a
block diagonal (`[out, S*r]`); the engine's path adds x @ A^T @ B^T into the MASK rows with one
product against that block-diagonal B^T (fp32 on a reduced-precision CPU layer). Per-slice
parameters stay the source of truth (PEFT names, training); the fused pair is a cache keyed by
their versions. Rows outside the selection are never touched, so they stay bitwise equal to the
base product (what makes R-ISD lossless).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

LoraRows = slice | torch.Tensor | None
"""Rows that get the LoRA delta: a slice (the engine puts every MASK row last in its flat batch),
an index tensor (dense training batches), or None (no LoRA this call)."""


GEMM_BACKENDS = ("onednn", "mkl", "torch")
MKL_PACK_ROWS = 16
"""The row count MKL's packed weights are built for (see the module docstring: any count works)."""
INVARIANT_ROWS = 32
"""Reduced-precision (bf16/fp16) products on the CPU run on oneDNN in pieces of at most this many
rows: up to 32 rows a row's product is bitwise the same whatever the row count and the row's place
(oneDNN's AMX/AVX-512 bf16 kernels; from 33 rows it changes), so every row is computed the same in
a 1-row AR step, a 7-row R-ISD block or a prefill chunk (batch invariance, DESIGN §1;
tests/workers/test_batch_invariance.py checks this build, workers.batch_invariance at start-up)."""


def cpu_gemm_backend() -> str:
    """`auto` (default: oneDNN, except at the row counts where the engine measured MKL faster,
    `LoRALinear.gemm_rows`), or one of `GEMM_BACKENDS` forced everywhere, from
    `IDLM_CPU_GEMM` (read once per product, so tests can switch)."""
    v = os.environ.get("IDLM_CPU_GEMM", "auto").strip().lower() or "auto"
    if v != "auto" and v not in GEMM_BACKENDS:
        raise ValueError(f"IDLM_CPU_GEMM: must be 'auto', 'onednn', 'mkl' or 'torch', got {v!r}")
    return v


def row_bucket(m: int) -> int:
    """The row count a oneDNN product of `m` rows runs at: `m` up to 32, above that rounded up to
    one of 8 steps per octave (at most 12.5% padding; 72 counts up to 1024 rows).

    Why: oneDNN builds (JIT-compiles) and caches a primitive per input shape, ~0.7 MB each. Prefill
    chunks and mixed batches give every row count from 1 to the token budget, so a serving replica
    kept building primitives: its RSS grew by hundreds of MB over a soak and its allocator arenas
    stayed fragmented by the evicted ones (bench/rss_probe.py; 4 weights x 1024 row counts: +1.3 GB,
    bucketed: +200 MB, flat after the first pass). Row results do not depend on the zero rows
    appended (each output row is its own dot products; tests/workers/test_lean_forward.py)."""
    if m <= 32:
        return m
    q = 1 << (m.bit_length() - 4)
    return -(-m // q) * q


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, in] @ packed^T (+ bias) -> [M, out], run at `row_bucket(M)` rows (fp32) or in pieces
    of `INVARIANT_ROWS` (reduced precision: batch invariance; at most 32 primitive shapes too)."""
    m = x.shape[0]
    if x.dtype != torch.float32 and m > INVARIANT_ROWS:
        return torch.cat([onednn_linear(x[i : i + INVARIANT_ROWS], packed, bias) for i in range(0, m, INVARIANT_ROWS)])
    b = row_bucket(m)
    x = x.contiguous() if b == m else torch.cat([x, x.new_zeros(b - m, x.shape[1])])
    y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return y if b == m else y[:m]


def mkl_linear(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, in] @ W^T (+ bias) -> [M, out] on MKL's packed sgemm; `packed`: (MKL's packed W, a
    zero-stride [out, in] view standing in for W: the op reads only its sizes and dtype, since the
    row count passed is always the input's own, so it never falls back to the unpacked weight)."""
    return torch.ops.mkl._mkl_linear(x.contiguous(), packed[0], packed[1], bias, x.shape[0])


def mkl_packed_available() -> bool:
    """Whether this torch build has MKL's packed sgemm ops."""
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")


def pack_weight(backend: str, w: torch.Tensor):
    """`w` [out, in] in `backend`'s packed layout, or None where this build or dtype has none."""
    if w.device.type != "cpu":
        return None
    try:
        with torch.no_grad():
            if backend == "onednn" and w.dtype in (torch.float32, torch.bfloat16) and \
                    torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
                return torch.ops.mkldnn._reorder_linear_weight(w)
            if backend == "mkl" and w.dtype == torch.float32 and mkl_packed_available():
                return torch.ops.mkl._mkl_reorder_linear_weight(w, MKL_PACK_ROWS), w.new_zeros(()).expand(w.shape)
    except RuntimeError:  # an op build without this path: keep F.linear
        return None
    return None


PACKED_LINEAR = {"onednn": onednn_linear, "mkl": mkl_linear}
"""The packed products by backend: (x, packed weight from `pack_weight`, bias) -> x @ W^T + bias."""


class LoRALinear(nn.Linear):
    """`nn.Linear` over the concatenation of named output slices, with an optional gated LoRA per slice."""

    def __init__(self, in_features: int, slices: list[tuple[str, int]], bias: bool = False, device=None) -> None:
        super().__init__(in_features, sum(n for _, n in slices), bias=bias, device=device)
        self.slices = list(slices)  # [(name, out_features)] in output order
        self.lora_A = nn.ParameterDict()  # slice name -> [r, in]
        self.lora_B = nn.ParameterDict()  # slice name -> [out_s, r]
        self.lora_scaling = 0.0
        self.lora_dropout = 0.0  # on the LoRA path's input, training (grad) path only
        # (backend, with LoRA A) -> (weight, its version, LoRA versions or None, packed W or [W; A],
        # None where unsupported); the engine's LoRA layers keep up to four (docs/benchmarks.md)
        self._packed: dict[tuple[str, bool], tuple] = {}
        self._fused: tuple | None = None  # (versions of the LoRA params, A [S*r, in], B [out, S*r] * scaling)
        self.fixed_backend: str | None = None
        """A backend for every row count (e.g. MKL's packed sgemm, batch-invariant, for the fp32
        head of a bf16 model), ahead of `gemm_rows` and `IDLM_CPU_GEMM`."""
        self.gemm_rows: dict[int, str] = {}
        """{row count: backend} of the products that do not run on oneDNN under `IDLM_CPU_GEMM=auto`:
        on some CPUs MKL (packed or not) beats it at a few rows (workers.cpu_gemm measures it)."""
        self._lora_changed()

    # -- slices ---------------------------------------------------------------------------------
    @property
    def slice_names(self) -> list[str]:
        return [n for n, _ in self.slices]

    def slice_range(self, name: str) -> tuple[int, int]:
        start = 0
        for n, size in self.slices:
            if n == name:
                return start, start + size
            start += size
        raise KeyError(name)

    @property
    def has_lora(self) -> bool:
        return bool(self._lora_names)

    @property
    def lora_rank(self) -> int:
        return next(iter(self.lora_A.values())).shape[0] if self.has_lora else 0

    def add_lora(self, rank: int, scaling: float, names: list[str] | None = None, init_b_zero: bool = True) -> None:
        """Fresh (trainable) LoRA weights on the named slices (all when None)."""
        dev, dt = self.weight.device, self.weight.dtype
        for name in names or self.slice_names:
            lo, hi = self.slice_range(name)
            a = torch.empty(rank, self.in_features, device=dev, dtype=dt)
            nn.init.kaiming_uniform_(a, a=5**0.5)
            b = torch.zeros(hi - lo, rank, device=dev, dtype=dt)
            if not init_b_zero:
                nn.init.normal_(b, std=0.02)
            self.lora_A[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(b)
        self.lora_scaling = scaling
        self._lora_changed()

    def set_lora(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Frozen LoRA weights of one slice (an adapter loaded from disk)."""
        dev, dt = self.weight.device, self.weight.dtype
        self.lora_A[name] = nn.Parameter(a.to(device=dev, dtype=dt), requires_grad=False)
        self.lora_B[name] = nn.Parameter(b.to(device=dev, dtype=dt), requires_grad=False)
        self.lora_scaling = scaling
        self._lora_changed()

    def clear_lora(self) -> None:
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self._lora_changed()

    def _lora_changed(self) -> None:
        # the slices with LoRA in output order, and their parameters (the fused cache's sources)
        self._lora_names = [n for n in self.slice_names if n in self.lora_A]
        self._lora_params = [self.lora_A[n] for n in self._lora_names] + [self.lora_B[n] for n in self._lora_names]
        self._fused = None
        self._tail: tuple | None = None  # (weight, versions, bias, B^T, {backend: packed [W; A]})

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, lora_rows: LoraRows = None) -> torch.Tensor:
        if not self.has_lora or lora_rows is None:
            return self._base(x)
        if isinstance(lora_rows, slice):
            if torch.is_inference_mode_enabled():
                return self._forward_tail_rows(x, lora_rows)
            lora_rows = torch.arange(x.shape[0], device=x.device)[lora_rows]
        y = self._base(x)
        if lora_rows.numel() == 0:
            return y
        a, b = self._fused_lora()
        xs = x.index_select(0, lora_rows)
        if self.lora_dropout and torch.is_grad_enabled():
            xs = F.dropout(xs, self.lora_dropout, training=True)
        delta = F.linear(F.linear(xs, a), b)
        return y.index_add(0, lora_rows, delta.to(y.dtype))

    def _forward_tail_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """The engine's path: the MASK rows are one slice of the flat batch."""
        if rows.indices(x.shape[0])[0] >= x.shape[0]:
            # No MASK rows this step (an AR round of the adaptive stride): the base weight alone,
            # not the one with LoRA A under it (its extra columns cost ~4.5% of SmolLM2's GEMMs).
            # The price: an R-ISD engine that runs both kinds of steps keeps both packed copies.
            return self._base(x)
        backend = self._backend(x)
        merged, bias, bt = self._tail_weights(backend)
        out = self.out_features
        if merged is not None:
            # One packed GEMM against [W; A]: the base output and every row's x @ A^T (the clean
            # rows' extra columns are wasted, and cheaper than a second small GEMM call). Its first
            # `out` columns are bit-identical to the product with W alone on the same backend (each
            # output column is its own dot product); tests/workers/test_lean_forward.py checks this.
            full = PACKED_LINEAR[backend](x, merged, bias)
            y, xa = full[:, :out], full[rows, out:]
        else:
            y, xa = self._base(x, backend), F.linear(x[rows], self._fused_lora()[0])
        # One product against every slice's B^T at once (block-diagonal, zeros where a slice has
        # no LoRA), added into the MASK rows only. Per slice, with no zero blocks to read, costs
        # less GEMM time but three more ops a slice, and at these sizes an op's fixed cost
        # dominates (SmolLM2, 7 slices a layer: docs/benchmarks.md item 14).
        ym = y[rows]
        if bt.dtype == xa.dtype:
            ym.addmm_(xa, bt)
        else:
            # reduced precision on the CPU: bf16 products this small cost ~25 us a call on oneDNN
            # (fp32: ~6), so B^T is kept in fp32; the fp32 delta is added into the bf16 MASK rows
            # and rounded once (an in-place add of fp32 into bf16: no separate cast)
            ym += xa.float() @ bt
        return y

    def _tail_weights(self, backend: str) -> tuple:
        """(packed [W; A] on `backend` or None, its bias, B^T [S*r, out] block-diagonal with the
        scaling folded in, fp32 on a reduced-precision CPU layer): one version check a call (the
        inference path only); B^T is shared by the backends, the packed weights are per backend."""
        w = self.weight
        key = (w._version, None if self.bias is None else self.bias._version, [p._version for p in self._lora_params])
        t = self._tail
        if t is None or t[0] is not w or t[1] != key:
            with torch.no_grad():
                b = self._fused_lora()[1]
                t = self._tail = (w, key, self.bias_with_lora_a(), (b.float() if w.device.type == "cpu" else b).t().contiguous(), {})
        merged = t[4].get(backend)
        if merged is None and backend != "torch":
            merged = t[4][backend] = self._packed_weight(backend, with_lora_a=True)
        return merged, t[2], t[3]

    def bias_with_lora_a(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return torch.cat([self.bias, self.bias.new_zeros(len(self._lora_names) * self.lora_rank)])

    def _base(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        backend = backend or self._backend(x)
        packed = self._packed_weight(backend) if backend != "torch" else None
        if packed is not None:
            return PACKED_LINEAR[backend](x, packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _backend(self, x: torch.Tensor) -> str:
        """The GEMM of a product with input `x` (`IDLM_CPU_GEMM`, `gemm_rows`): `torch` (F.linear)
        off the CPU, for autograd and for batched inputs. Both of a step's products (with and
        without LoRA A) follow the same rule, so a step's clean rows stay bitwise the base product
        at its row count."""
        w = self.weight
        if x.dim() != 2 or w.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return "torch"
        if self.fixed_backend is not None:
            return self.fixed_backend
        if w.dtype != torch.float32:
            return "onednn"  # reduced precision: oneDNN only, batch-invariant (INVARIANT_ROWS)
        backend = cpu_gemm_backend()
        if backend == "auto":
            return self.gemm_rows.get(x.shape[0], "onednn")
        return backend

    def _packed_weight(self, backend: str, with_lora_a: bool = False):
        """The weight in `backend`'s packed layout (None where unsupported: F.linear then);
        `with_lora_a`: the weight with the fused LoRA A stacked under it, `[out + S*r, in]`."""
        w = self.weight
        lora_versions = [p._version for p in self._lora_params] if with_lora_a else None
        p = self._packed.get((backend, with_lora_a))
        if p is None or p[0] is not w or p[1] != w._version or p[2] != lora_versions:
            src = torch.cat([w.detach(), self._fused_lora()[0]]) if with_lora_a else w.detach()
            p = self._packed[backend, with_lora_a] = (w, w._version, lora_versions, pack_weight(backend, src))
        return p[3]

    def _fused_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [S*r, in], B [out, S*r] with the scaling folded in); cached unless training."""
        params = self._lora_params
        training = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if not training:
            key = [p._version for p in params]
            f = self._fused
            if f is not None and f[0] == key:
                return f[1], f[2]
        names = self._lora_names
        with torch.set_grad_enabled(training):
            a = torch.cat([self.lora_A[n] for n in names])  # [S*r, in]
            r, S = self.lora_rank, len(names)
            blocks = []
            for n, size in self.slices:  # row block of each slice; zeros where a slice has no LoRA
                if n in self.lora_B:
                    i = names.index(n)
                    blocks.append(F.pad(self.lora_B[n], (i * r, (S - i - 1) * r)))
                else:
                    blocks.append(self.lora_B[names[0]].new_zeros(size, S * r))
            b = torch.cat(blocks) * self.lora_scaling  # [out, S*r]
        if not training:
            self._fused = (key, a, b)
        return a, b
