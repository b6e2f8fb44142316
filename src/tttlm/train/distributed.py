"""Multi-process training under ``torchrun``: process group, DDP and FSDP2 wrapping.

The model code is single-device; everything here is applied from outside (torchtitan style).

* DDP: a full replica per process; gradients are averaged across processes. The meta forward
  pass calls ``torch.autograd.grad`` on the fast weights inside ``forward``; that call only
  reaches the fast weights (never the parameters' gradient accumulators), so DDP's reducer
  hooks fire exactly once per parameter, in the outer backward, and
  ``find_unused_parameters=False`` is correct (every parameter gets an outer gradient).
* FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6): parameters, gradients and
  AdamW state are sharded over processes. The prefix blocks (first-order only) are sharded one
  by one; the TTT blocks, whose weights the inner
  loop differentiates twice inside one forward pass, stay in the root group, which is gathered
  for the whole forward and backward. For the baselines every block is sharded.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tttlm.model.model import TTTForCausalLM


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device, timeout_min: float = 30.0) -> DistInfo:
    """Join the ``torchrun`` job (NCCL on CUDA, gloo on CPU); a no-op for a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def several_processes() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself for one process)."""
    if several_processes():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over processes (the value itself for a single process)."""
    if several_processes():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    # The trainer passes the forward options per call, so DDP needs no attribute forwarding.
    return DDP(model, device_ids=ids, find_unused_parameters=False)


def wrap_fsdp(model: TTTForCausalLM, mesh: Any = None) -> nn.Module:
    """Shard ``model`` with FSDP2 in place and return it (the same object)."""
    if not fsdp_available():
        raise RuntimeError(f"FSDP2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); "
                           f"this is torch {torch.__version__}: use parallel=ddp")
    from torch.distributed.fsdp import fully_shard

    ttt_ids = {id(layer) for layer in model.ttt_layers}
    for layer in model.layers:
        if id(layer) in ttt_ids:
            continue
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> TTTForCausalLM:
    inner = getattr(model, "module", model)
    assert isinstance(inner, TTTForCausalLM)
    return inner


def is_fsdp(model: nn.Module) -> bool:
    return type(model).__name__.startswith("FSDP")


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU (gathered from all ranks when sharded)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )
        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )
        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )
        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state)
