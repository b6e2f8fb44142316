"""Wrappers applied to a model from outside, in torchtitan's order: activation checkpointing,
then compile, then data parallelism (DDP or FSDP2).

The model code knows none of them. :func:`parallelize` is the one place that applies them, so
that every training path (the trainer, benchmarks, tests) gets the same stack in the same order:

1. **Activation checkpointing** of the blocks: each block's whole-sequence calls (prefix blocks,
   pretrain mode, baselines) are recomputed in the backward pass. The TTT chunks are not
   wrapped here: the model checkpoints them itself when asked (the ``checkpoint_chunks``
   forward option), recomputing each chunk whole, its inner step included.
2. **Compile**: ``TTTForCausalLM.compile_blocks`` runs the code around attention through
   ``torch.compile`` (one graph shared by all blocks). Where gradients of gradients are taken
   the chunks stay eager: the rule lives in one place, :attr:`ForwardOptions.compile_chunks
   <tttlm.model.model.ForwardOptions.compile_chunks>` (compiled TTT chunks only when no outer
   gradient is taken, since compiled graphs cannot be differentiated twice).
3. **Data parallelism** (:mod:`tttlm.train.distributed`): DDP (a replica per process) or FSDP2
   (``fully_shard``). Under FSDP2 the prefix blocks are sharded one by one, and the TTT blocks
   stay in the root group (gathered for the whole forward and backward), because the inner
   loop differentiates their weights twice inside one forward pass; sharding them too is
   issue 19.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tttlm.model.cache import WholeSequence
from tttlm.model.model import TTTForCausalLM
from tttlm.train import distributed as D
from tttlm.train.config import Parallel


def apply_activation_checkpointing(model: TTTForCausalLM) -> None:
    """Recompute every whole-sequence block call in the backward pass (the block's
    ``forward`` is wrapped, so module hooks, FSDP2's included, still run through
    ``__call__``); calls on TTT chunks pass through unchanged."""
    for layer in model.layers:
        original = layer.forward

        def wrapped(h: torch.Tensor, cache: Any, *args: Any, _f: Any = original,
                    **kwargs: Any) -> torch.Tensor:
            if isinstance(cache, WholeSequence):
                return checkpoint(_f, h, cache, *args, use_reentrant=False, **kwargs)
            return _f(h, cache, *args, **kwargs)

        layer.forward = wrapped  # type: ignore[method-assign]


def apply_compile(model: TTTForCausalLM) -> None:
    """Compile the code around attention in every block (``compile_blocks``): whole-sequence
    blocks always; TTT chunks as :attr:`ForwardOptions.compile_chunks
    <tttlm.model.model.ForwardOptions.compile_chunks>` decides."""
    model.compile_blocks = True


def data_parallel(parallel: Parallel | str | None) -> Parallel | None:
    """What ``parallel`` does in this process: ``auto`` and ``ddp`` are DDP in a job of several
    processes and nothing in a single one; ``fsdp`` is FSDP2 in any case."""
    if parallel is None:
        return None
    parallel = Parallel(parallel)
    if parallel is Parallel.FSDP:
        return parallel
    return Parallel.DDP if D.several_processes() else None


def parallelize(model: TTTForCausalLM, *, activation_checkpointing: bool, compile: bool,
                parallel: Parallel | str | None, device: torch.device,
                mesh: Any = None) -> nn.Module:
    """Apply activation checkpointing, compile and data parallelism to ``model`` (already on
    ``device``), in that order, and return what to train: ``model`` itself, or its DDP
    wrapper. ``parallel``: ``auto`` (DDP when several processes run), ``ddp`` (a no-op in a
    single process), ``fsdp`` (FSDP2, in place; ``mesh``: its device mesh) or ``None``."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    mode = data_parallel(parallel)
    if mode is Parallel.FSDP:
        return D.wrap_fsdp(model, mesh=mesh)
    if mode is Parallel.DDP:
        return D.wrap_ddp(model, device)
    return model
