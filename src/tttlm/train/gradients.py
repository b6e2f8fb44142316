"""The gradient of one optimizer step, accumulated over micro-batches, with no host read.

Shared by the eager step (:func:`tttlm.train.trainer.forward_backward`, which reads the results
back) and the captured one (:class:`tttlm.train.static_step.StaticStep`, whose CUDA graph may
not wait for the host): both run these very operations, so that they agree bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from tttlm.data import Batch
from tttlm.devices import autocast as autocast_to
from tttlm.train import distributed as D
from tttlm.ttt.inner import GradMode


def split_micro(batch: Batch, micro: int) -> list[Batch]:
    """Cut a ``[B, T]`` batch into micro-batches of ``micro`` sequences (0: one piece)."""
    B = batch.input_ids.shape[0]
    if micro <= 0 or micro >= B:
        return [batch]
    return [Batch(*(t[i:i + micro] for t in batch)) for i in range(0, B, micro)]


def accumulate_gradients(model: nn.Module, micro_batches: list[Batch], *, ttt: bool,
                         inner_lr: float | torch.Tensor, grad_mode: GradMode = GradMode.EXACT,
                         checkpoint_chunks: bool = False, autocast: torch.dtype | None = None,
                         autocast_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Accumulate into ``.grad`` the gradient of the mean of the micro-batch losses.

    Returns, on the device, the mean loss and the mean inner-update norm (float64, averaged
    over processes), and the number of tokens. ``inner_lr`` may be a 0-dim tensor (a captured
    step reads it from the device); ``autocast_cache=False`` is what a CUDA-graph capture needs
    (a cast cached in one replay would be stale in the next).

    Each micro-batch loss is already a mean over its sequences, so with equal micro-batches this
    equals the gradient of the whole batch's loss. Under DDP the all-reduce runs only after the
    last micro-batch (``no_sync``); FSDP2 likewise defers its reduce-scatter.
    """
    device = next(model.parameters()).device
    n = len(micro_batches)
    losses, norms, tokens = [], [], 0
    cast: dict[str, Any] = {} if autocast_cache else {"cache_enabled": False}
    for i, part in enumerate(micro_batches):
        last = i == n - 1
        if hasattr(model, "no_sync") and not last:
            sync: Any = model.no_sync()
        else:
            sync = contextlib.nullcontext()
        if D.is_fsdp(model):
            model.set_requires_gradient_sync(last)  # type: ignore[operator]
        input_ids, labels, mask = (t.to(device, non_blocking=True) for t in part)
        with sync:
            with autocast_to(device, autocast, **cast):
                out = model(input_ids, labels=labels, loss_mask=mask, ttt=ttt, inner_lr=inner_lr,
                            grad_mode=grad_mode, checkpoint_chunks=checkpoint_chunks)
            (out.loss / n).backward()
        losses.append(out.loss.detach())
        if ttt and out.inner_update_norms is not None and out.inner_update_norms.numel():
            norms.append(out.inner_update_norms.detach().float().mean())
        tokens += input_ids.numel()
    # float64 so that reported losses of float64 runs keep their precision
    loss = torch.stack(losses).double().mean()
    norm = torch.stack(norms).double().mean() if norms else torch.zeros_like(loss)
    both = D.all_reduce_mean(torch.stack([loss, norm]))
    return both[0], both[1], tokens
