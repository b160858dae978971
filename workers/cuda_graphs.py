"""CUDA graphs for the uniform decode step (nano-vllm / vLLM "FULL" graphs for uniform decode).

Owns: which steps are captured and at what padded shape (`uniform_shape`, `graph_padding`), the
batch buckets and `CudaGraphRunner` (capture on first use, replay).

What is captured: the forward from the packed step tensor (`workers.kernel_attention.pack_step`)
to the final norm's hidden states: the device-side metadata build, every layer (Triton KV write
and attention included). The LM head runs outside on the rows that need logits, as in nano-vllm.
Inputs live in one static int32 buffer; a replay is one host-to-device copy into it plus
`graph.replay()`.

Which steps: decode steps, where every request feeds only `pending` plus its drafts and MASK rows
(no prefill chunk), B <= the largest bucket. Prefill and mixed steps run eagerly.

Adaptive strides (workers.stride) give requests different strides per round, and cold and verify
rounds differ too (cold: 1 clean + n-1 MASK rows; verify: n clean + n-1 MASK), so a decode step is
seldom uniform as it comes. We pad rows instead of requiring uniformity: every request is padded to
the step's largest clean count c and largest MASK count m (the padding rows take positions after
the request's real rows, so they change no real row, and write no KV: `workers.batch_layout`), and
the batch to the next bucket with dummy requests (`workers.batch_layout.build_step_batch`). The graph key is therefore (bucket, c, m) plus the
static launch choices (`StepShape`); with stride N there are at most N * (N - 1) + 1 (c, m) pairs
per bucket, captured lazily the first time they occur, at most `max_graphs` in all (then eager).
A step whose padding would more than double its rows (`graph_padding`) runs eagerly instead: padding is
free only while the step is memory-bound.

Capture follows torch's rules: warm-up runs first on a side stream (Triton compiles, cuBLAS
workspaces, the LoRA cache), all graphs share one memory pool, capture inputs are all-padding
(`seq_len = c + m`, no KV written), and nothing in the captured code syncs with the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from workers.kernel_attention import StepShape


def capture_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16 (vLLM's spacing), up to `max_batch`."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, 513, 16))
    out = [b for b in sizes if b < max_batch]
    return out + [max_batch]


def uniform_shape(items) -> tuple[int, int] | None:
    """(c, m): the most clean and MASK rows of any request, when every item is a decode round
    (`pending` + drafts + MASKs); None for a step with a prefill chunk."""
    c = m = 0
    for it in items:
        if not it.final or it.num_real != 1:
            return None
        c, m = max(c, 1 + it.num_drafts), max(m, it.num_masks)
    return (c, m) if items else None


def graph_padding(items, num_rows: int, buckets: list[int]) -> tuple[int, int, int] | None:
    """(bucket, c, m) to pad a decode step to, or None (eager): not a decode step, more requests than
    the largest bucket, or padding that would more than double the step's rows."""
    cm = uniform_shape(items)
    if cm is None or len(items) > buckets[-1]:
        return None
    bucket = next(b for b in buckets if b >= len(items))
    if bucket * sum(cm) > 2 * num_rows + 16:
        return None
    return bucket, cm[0], cm[1]


class CudaGraphRunner:
    """Captured forwards keyed by `StepShape`; `forward(packed, shape) -> hidden [T, H]` is the
    function captured (and the one the eager path calls)."""

    def __init__(self, forward: Callable[[torch.Tensor, StepShape], object], device: torch.device,
                 buffer_size: int, max_graphs: int = 64, capture: bool = True) -> None:
        self.forward = forward
        self.device = device
        self.capture = capture  # False: run `forward` eagerly on the static buffer (CPU tests)
        self.static = torch.zeros(buffer_size, dtype=torch.int32, device=device)
        self.max_graphs = max_graphs
        self.graphs: dict[StepShape, tuple[torch.cuda.CUDAGraph | None, object]] = {}
        self.pool = None
        self.replays = 0

    def can_run(self, shape: StepShape) -> bool:
        return shape.packed_size <= self.static.numel() and (shape in self.graphs or len(self.graphs) < self.max_graphs)

    def run(self, packed: torch.Tensor, shape: StepShape) -> tuple[object, torch.Tensor]:
        """(the forward's outputs from the replay, the static inputs on the device). `packed` is the
        host tensor of `pack_step`; its tail (logit rows) is copied too and read by the caller."""
        entry = self.graphs.get(shape)
        if entry is None:
            entry = self.graphs[shape] = self._capture(shape) if self.capture else (None, None)
        view = self.static[: packed.numel()]
        view.copy_(packed, non_blocking=True)
        self.replays += 1
        if entry[0] is None:
            return self.forward(view, shape), view
        entry[0].replay()
        return entry[1], view

    def _capture(self, shape: StepShape) -> tuple[torch.cuda.CUDAGraph, object]:
        # All-padding inputs: c_real = m_real = 0, ctx 0, block 0 -> every slot -1, seq_len = rows.
        B = shape.num_requests
        rows = shape.num_rows // B
        c = shape.num_clean // B
        head = torch.zeros(5 * B + shape.num_rows + B * shape.width, dtype=torch.int32)
        head[3 * B : 4 * B] = c
        head[4 * B : 5 * B] = rows - c
        inputs = self.static[: shape.packed_size]
        inputs.copy_(head)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(inputs, shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(inputs, shape)
        if self.pool is None:
            self.pool = graph.pool()
        torch.cuda.synchronize(self.device)
        return graph, out
