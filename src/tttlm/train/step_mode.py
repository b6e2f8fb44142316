"""Which way a training step runs: ``step_mode`` resolved against the device and the job.

``eager`` is Python driving every kernel; ``compiled`` is the same step through compiled blocks
(:func:`tttlm.train.parallelize.apply_compile`; the meta-gradient's TTT chunks stay eager, as
:attr:`ForwardOptions.compile_chunks <tttlm.model.model.ForwardOptions.compile_chunks>`
rules); ``graph`` captures the whole step once as a CUDA graph and replays it
(:class:`tttlm.train.static_step.StaticStep`); ``auto`` is ``graph`` where a capture applies
and ``eager`` (``compiled`` with ``compile``) elsewhere. Verified through ``tttlm train`` on an
H200 (``benchmarks/results/train_cli_125m_8k.md``): the captured step trains like the eager one
and is the faster (125m, 8K, micro-batch 4: 44.5K vs 43.0K tokens/s; 48.6K with ``compile``).

What a captured step does not support, and why:

* a CPU: CUDA graphs exist only on CUDA devices;
* several processes (DDP, FSDP2): whole-step capture under DDP needs the wrapper built on a side
  stream, at least 11 eager warm-up iterations and NCCL's asynchronous error handling off
  (PyTorch's CUDA-graph notes), and FSDP2 gathers and frees parameters with host-side
  bookkeeping; neither has been verified here, so both are refused rather than risked;
* activation checkpointing: recomputation in the backward pass saves and restores the RNG
  state from the host, which a capture cannot do (not verified either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tttlm.errors import UserError
from tttlm.train.config import Parallel, StepMode


@dataclass(frozen=True)
class StepPlan:
    """A resolved ``step_mode``: capture the step as a CUDA graph, compile the blocks."""

    graph: bool
    compile: bool

    @property
    def name(self) -> str:
        """``eager``, ``compiled``, ``graph`` or ``compiled-graph`` (the benchmark's names)."""
        if self.graph:
            return "compiled-graph" if self.compile else "graph"
        return "compiled" if self.compile else "eager"


def graph_obstacle(device: torch.device, data_parallel: Parallel | None,
                   activation_checkpointing: bool) -> str | None:
    """Why the step cannot be captured here, or ``None`` when it can."""
    if device.type != "cuda":
        return "needs a CUDA device"
    if data_parallel is not None:
        return (f"does not support parallel={data_parallel.value} (several processes) yet: "
                "CUDA-graph capture under DDP/FSDP2 is not verified")
    if activation_checkpointing:
        return ("does not support activation_checkpointing=true yet: recomputation under "
                "CUDA-graph capture is not verified")
    return None


def resolve_step_mode(mode: StepMode | str, *, compile: bool, device: torch.device,
                      data_parallel: Parallel | None,
                      activation_checkpointing: bool) -> StepPlan:
    """The plan for ``mode``; ``auto`` is ``graph`` where nothing stands in the capture's way,
    else ``eager`` (``compiled`` with ``compile``). An explicit ``graph`` that cannot be
    captured here is a :class:`UserError` saying why."""
    mode = StepMode(mode)
    if mode is StepMode.EAGER and compile:
        raise UserError("step_mode=eager contradicts compile=true; use step_mode=compiled, or "
                        "compile=false")
    if mode is StepMode.COMPILED:
        return StepPlan(graph=False, compile=True)
    if mode is StepMode.EAGER:
        return StepPlan(graph=False, compile=False)
    obstacle = graph_obstacle(device, data_parallel, activation_checkpointing)
    if mode is StepMode.GRAPH:
        if obstacle is not None:
            fallback = "compiled" if compile else "eager"
            raise UserError(f"step_mode=graph {obstacle}; use step_mode={fallback}")
        return StepPlan(graph=True, compile=compile)
    # auto: the fastest that applies; compile stays the user's choice (it costs a compilation
    # of tens of seconds at start and changes the kernels, which some want to keep eager).
    return StepPlan(graph=obstacle is None, compile=compile)
