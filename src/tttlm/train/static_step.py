"""The training step over static device buffers: what ``step_mode=graph`` captures.

One call of :meth:`StaticStep.step` is a whole optimizer step — forward with its inner steps,
meta-gradient (micro-batches accumulated), global-norm clip, AdamW — that reads nothing from
the host and decides nothing on the host, so that :class:`tttlm.train.graphs.GraphedStep` can
capture it once and replay it:

* what changes from step to step (the outer LR of every param group, the inner LR η of the
  warm-up) lives in device tensors, filled in place before each replay;
* a non-finite loss or gradient norm is decided on the device: the optimizer steps anyway and
  a select puts back the weights and optimizer state of before (what the eager trainer keeps
  by not stepping); the host reads the flag after the replay, with the loss;
* the warm-up calls a capture needs run on the real weights and optimizer state, which are
  then restored in place (:func:`preserved`): warm-up leaves no trace on training.

The same object runs the step un-captured (``capture=False``), which is how it is tested on a
CPU against the eager step, bit for bit. Costs of the select: a copy of the weights and of
AdamW's two moments (three times the weights' memory), and one pass over them per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tttlm.data import Batch
from tttlm.train import checkpoint as ckpt
from tttlm.train.gradients import accumulate_gradients, split_micro
from tttlm.train.graphs import GraphedStep
from tttlm.ttt.inner import GradMode

# Param-group keys that choose AdamW's implementation, not its mathematics: this run's, never
# a checkpoint's (a run of another step mode wrote it).
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


# ------------------------------------------------------------------------ optimizer state
def prime_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter without state the state AdamW's first step would create
    (zero moments, step 0, on the device and in the dtype AdamW chooses): a captured step must
    find every tensor it updates before the capture."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"a static step primes Adam/AdamW state, not {type(optimizer).__name__}")
    wide = torch.get_default_dtype() == torch.float64
    for group in optimizer.param_groups:
        on_device = group["capturable"] or group["fused"]
        step_dtype = torch.float64 if wide and not group["fused"] else torch.float32
        for p in group["params"]:
            state = optimizer.state[p]
            if state or not p.requires_grad:
                continue
            state["step"] = torch.zeros((), dtype=step_dtype,
                                        device=p.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)


def implementation(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The implementation flags of every param group (:data:`IMPLEMENTATION_KEYS`)."""
    return [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]


def reapply_implementation(optimizer: torch.optim.Optimizer,
                           flags: list[dict[str, Any]]) -> None:
    """Put back ``flags`` after ``load_state_dict`` (which takes the checkpoint's), and move
    each ``step`` where AdamW keeps it under them: on the parameter's device for fused or
    capturable AdamW, on the CPU otherwise."""
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                where = p.device if on_device else torch.device("cpu")
                dtype = torch.float32 if group.get("fused") else step.dtype
                optimizer.state[p]["step"] = step.to(device=where, dtype=dtype)


def state_tensors(params: Sequence[torch.Tensor],
                  optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The weights and every optimizer state tensor of them: what one step changes."""
    tensors = list(params)
    for p in params:
        tensors += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return tensors


@contextlib.contextmanager
def preserved(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Whatever runs inside leaves ``tensors`` and the random generators as they were.

    The tensors are restored in place (a CUDA graph captured inside keeps their addresses), so
    the warm-up steps of a capture can run on the real weights and optimizer state."""
    saved = [t.detach().clone() for t in tensors]
    rng = ckpt.rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        ckpt.set_rng_state(rng)


@contextlib.contextmanager
def learning_rates(optimizer: torch.optim.Optimizer,
                   lrs: Sequence[torch.Tensor]) -> Iterator[None]:
    """The optimizer reads each param group's LR from the device tensor in ``lrs`` inside (a
    captured step keeps reading it at every replay); outside, the groups keep their float LRs,
    so that the scheduler and checkpoints see what they always saw."""
    groups = optimizer.param_groups
    before = [g["lr"] for g in groups]
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    try:
        yield
    finally:
        for g, lr in zip(groups, before):
            g["lr"] = lr


# ------------------------------------------------------------------------------ the step
@dataclass
class StaticResult:
    """What one static step reports (read from the device after it ran)."""

    loss: float
    inner_update_norm: float
    grad_norm: float
    skipped: bool
    tokens: int


class StaticStep:
    """The whole training step over static device buffers, captured as a CUDA graph
    (``capture=True``) or run as it is (``capture=False``: CPU tests).

    Args:
        model: the model to train (one process: no DDP or FSDP2 wrapper).
        optimizer: its AdamW (fused and ``capturable=True`` for a capture).
        ttt, grad_mode, autocast: as for :func:`tttlm.train.gradients.accumulate_gradients`.
        grad_clip: global L2 norm the outer gradient is clipped to (0: none).
        micro_batch_size: sequences per forward pass (0: the whole batch).
        capture: capture a CUDA graph at the first call and replay it afterwards.
        warmup: calls before the capture (weights and optimizer state restored after them);
            also run un-captured, so that CPU tests exercise the restore.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, ttt: bool,
                 grad_mode: GradMode, grad_clip: float, micro_batch_size: int,
                 autocast: torch.dtype | None, capture: bool, warmup: int = 2) -> None:
        if capture and hasattr(model, "no_sync"):
            raise ValueError("a captured training step runs in one process: unwrap DDP")
        self.model, self.optimizer = model, optimizer
        self.ttt, self.grad_mode, self.autocast = ttt, grad_mode, autocast
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.micro_batch_size = micro_batch_size
        self.capture, self.warmup = capture, warmup
        param = next(model.parameters())
        self.device = param.device
        # Fused CUDA AdamW reads a tensor LR as float32; elsewhere the LR replaces a Python
        # float (a double) in AdamW's arithmetic, so float64 keeps every bit of it.
        lr_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        self.lrs = [torch.zeros((), dtype=lr_dtype, device=self.device)
                    for _ in optimizer.param_groups]
        # η multiplies the inner gradient's clip factor, computed in the weights' precision
        # (float32 under bf16 autocast): a Python float is cast to that dtype too.
        inner_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.inner_lr = torch.zeros((), dtype=inner_dtype, device=self.device)
        self.graph: GraphedStep | None = None
        self.tensors: list[torch.Tensor] = []
        self.before: list[torch.Tensor] = []
        self.built = False

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor,
             loss_mask: torch.Tensor) -> torch.Tensor:
        """The captured function: ``[loss, inner update norm, grad norm, skipped]`` (float64)
        on the device, weights and optimizer state updated (or kept, when not finite)."""
        model, optimizer = self.model, self.optimizer
        # None, so that under a capture the backward allocates the gradients in the graph's
        # memory pool (replays overwrite them in place).
        optimizer.zero_grad(set_to_none=True)
        micro = split_micro(Batch(input_ids, labels, loss_mask), self.micro_batch_size)
        loss, norm, _ = accumulate_gradients(
            model, micro, ttt=self.ttt, inner_lr=self.inner_lr, grad_mode=self.grad_mode,
            autocast=self.autocast, autocast_cache=not self.capture)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        with torch.no_grad():
            for b, t in zip(self.before, self.tensors):
                b.copy_(t)
        with learning_rates(optimizer, self.lrs):
            optimizer.step()
        with torch.no_grad():
            # Bit for bit the state of before where the step was not finite (a select, not
            # arithmetic: NaN and infinity do not leak through it).
            for b, t in zip(self.before, self.tensors):
                t.copy_(torch.where(bad.to(t.device), b, t))
        return torch.stack([loss, norm, grad_norm.to(loss.dtype), bad.to(loss.dtype)])

    def _build(self, inputs: list[torch.Tensor]) -> None:
        prime_optimizer_state(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.tensors = state_tensors(params, self.optimizer)
        self.before = [torch.empty_like(t) for t in self.tensors]
        with preserved(self.tensors):
            if self.capture:
                self.graph = GraphedStep(self.step, *inputs, warmup=self.warmup)
            else:
                for _ in range(self.warmup):
                    self.step(*inputs)
        self.built = True

    def __call__(self, batch: Batch, lrs: Sequence[float], inner_lr: float) -> StaticResult:
        """One optimizer step on ``batch`` (host tensors) at these LRs (one per param group)
        and η; captures first (after the warm-up) on the first call when asked."""
        for t, value in zip(self.lrs, lrs, strict=True):
            t.fill_(value)
        self.inner_lr.fill_(inner_lr)
        inputs = [t.to(self.device, non_blocking=True) for t in batch]
        if not self.built:
            self._build(inputs)
        out = self.graph(*inputs) if self.graph is not None else self.step(*inputs)
        loss, norm, grad_norm, bad = out.tolist()  # the one read of the device per step
        return StaticResult(loss, norm, grad_norm, bool(bad), batch.input_ids.numel())
