"""A whole training step — forward, inner steps, outer backward, optimizer — as one CUDA graph.

The meta forward pass runs the TTT blocks chunk by chunk with an inner SGD step after each
chunk; at small batches its thousands of small kernels leave the GPU waiting for Python (a
125m step at 8K and batch 1 keeps the GPU busy less than half of the time). Compiled graphs
cannot be differentiated twice, but a CUDA graph can hold any sequence of kernels: the step
is captured once — the exact second-order backward included — and replayed with new data
copied into its static input buffers.

Requirements, as for any CUDA graph: fixed shapes (one batch size and sequence length per
graph), no host synchronisation inside the step (the model skips its value checks while a
capture runs; the warm-up calls before the capture do them), an optimizer that supports
capture (``capturable=True``, e.g. fused AdamW), and a learning rate that is a tensor when it
changes between steps. The graph keeps its memory pool for its lifetime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class GraphedStep:
    """``step(*inputs) -> Tensor`` captured as a CUDA graph.

    ``step`` must read its data only from the tensors it is called with and do everything else
    on the device. The first ``warmup`` calls run eagerly on a side stream (this compiles
    Triton kernels and lets allocators settle, as capture requires), then one call is captured;
    every call of this object copies its arguments into the static inputs and replays.

    >>> graphed = GraphedStep(train_step, example_ids, example_labels)  # doctest: +SKIP
    >>> loss = graphed(ids, labels)  # a static tensor, overwritten by the next call
    """

    def __init__(self, step: Callable[..., torch.Tensor], *example_inputs: torch.Tensor,
                 warmup: int = 2) -> None:
        if not example_inputs or not all(t.is_cuda for t in example_inputs):
            raise ValueError("GraphedStep needs CUDA tensors as example inputs (CUDA graphs "
                             "exist only on CUDA devices)")
        self.step = step
        self.inputs = [t.clone() for t in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        _copy_into(self.inputs, inputs)
        self.graph.replay()
        return self.output


def _copy_into(static: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> None:
    if len(new) != len(static):
        raise ValueError(f"the graph was captured with {len(static)} inputs, got {len(new)}")
    for i, (dst, src) in enumerate(zip(static, new)):
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise ValueError(f"input {i} is {tuple(src.shape)} {src.dtype}, but the graph was "
                             f"captured for {tuple(dst.shape)} {dst.dtype}: capture another "
                             "GraphedStep for each shape")
        dst.copy_(src, non_blocking=True)
