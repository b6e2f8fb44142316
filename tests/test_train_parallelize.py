"""parallelize: activation checkpointing of the whole-sequence block calls only (same loss and
gradients), compile switched on, no wrapper in a single process; the one compiled-chunks rule."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from _helpers import tiny_model, tokens
from tttlm.model.model import ForwardOptions
from tttlm.train import parallelize as P
from tttlm.ttt.modes import GradMode


@pytest.mark.parametrize("variant", ["e2e", "swa"])
def test_checkpointed_blocks_give_the_same_gradients(variant: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    overrides: dict[str, Any] = {} if variant == "e2e" else {"variant": "swa",
                                                            "num_ttt_layers": None}
    plain, wrapped = tiny_model(**overrides), tiny_model(**overrides)
    calls: list[str] = []
    real = P.checkpoint

    def counted(fn: Any, h: torch.Tensor, cache: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(cache).__name__)
        return real(fn, h, cache, *args, **kwargs)

    monkeypatch.setattr(P, "checkpoint", counted)
    out = P.parallelize(wrapped, activation_checkpointing=True, compile=False, parallel="auto",
                        device=torch.device("cpu"))
    assert out is wrapped and not wrapped.compile_blocks  # one process: no DDP wrapper
    x, y = tokens(plain, 2, 24)
    losses = []
    for model in (plain, wrapped):
        loss = model(x, labels=y).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-12, msg=name)
    # Whole-sequence calls only: the prefix blocks (e2e) or every block (swa), once each; the
    # TTT chunks are the model's own checkpoint_chunks business.
    blocks = wrapped.config.num_prefix_layers if variant == "e2e" else wrapped.config.num_layers
    assert calls == ["WholeSequence"] * blocks


def test_compile_is_switched_on() -> None:
    model = tiny_model()
    assert P.parallelize(model, activation_checkpointing=False, compile=True, parallel=None,
                         device=torch.device("cpu")) is model
    assert model.compile_blocks


def test_data_parallel_in_one_process() -> None:
    assert P.data_parallel("auto") is None and P.data_parallel("ddp") is None
    assert P.data_parallel(None) is None
    assert P.data_parallel("fsdp") is P.Parallel.FSDP


@pytest.mark.parametrize("mode", list(GradMode))
@pytest.mark.parametrize("compiled", [False, True])
def test_chunks_compile_only_without_outer_gradient(mode: GradMode, compiled: bool) -> None:
    opts = ForwardOptions(ttt=True, mode=mode, inner_lr=1.0, compiled=compiled)
    assert opts.compile_chunks is (compiled and mode is GradMode.NONE)
