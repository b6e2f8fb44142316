"""Compiled blocks (``TTTForCausalLM.compile_blocks``) compute what the eager blocks compute,
in every mode: evaluation (compiled chunks), first-order and exact meta-gradients (compiled
prefix, eager chunks), pretrain mode and the full-attention baseline."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close, grads, tiny_model, tokens
from tttlm.ops.rope import apply_rope, rope_angles


def _run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
         ttt: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if mode == "none":
        with torch.no_grad():
            out = model(x, labels=y, ttt=ttt)
        return [out.loss, out.token_nll]
    out = model(x, labels=y, ttt=ttt, grad_mode=mode)
    out.loss.backward()
    return [out.loss, out.token_nll, *grads(model).values()]


@pytest.mark.parametrize("variant, ttt, modes", [
    ("e2e", True, ("none", "first_order", "exact")),
    ("e2e", False, ("exact",)),
    ("full", False, ("exact",)),
], ids=["e2e-meta", "e2e-pretrain", "full"])
def test_compiled_blocks_match_eager(variant: str, ttt: bool, modes: tuple[str, ...]) -> None:
    from tttlm.ops import linear_nll as head

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    head._compiled.cache_clear()  # so that it counts the head functions compiled here
    model = tiny_model(variant=variant)
    x, y = tokens(model, 2, 40)  # longer than the window: chunks and a rolling cache
    for mode in modes:
        model.compile_blocks = False
        eager = _run(model, x, y, mode, ttt)
        model.compile_blocks = True
        compiled = _run(model, x, y, mode, ttt)
        for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
            # fp64: compiled and eager differ by summation order only (6e-14 seen); 1e-10
            # still fails a stray fp32 cast or an fp32 table in a compiled graph (~1e-7).
            assert_close(b, a, rel_l2=1e-10, name=f"{mode} output {i}")
    # The compiled path really ran, and layers shared their graphs (no recompile per layer):
    # at most 12 graphs of block code, plus one each for the head's elementwise functions
    # compiled in these modes (linear_nll's _stats, _dlogits and _second; the inner-step
    # head's nll_and_dlogits), each compiled once for all shapes (dynamic).
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    head_graphs = head._compiled.cache_info().currsize if variant == "e2e" and ttt else 0
    assert head_graphs <= 4
    assert 0 < graphs - head_graphs <= 12


def test_rope_complex_form_matches_real_form_and_is_twice_differentiable() -> None:
    cos, sin = rope_angles(torch.arange(5), 8, 10000.0, torch.float64)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    pairs = x.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    ref = torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2)
    assert_close(apply_rope(x, cos, sin), ref, atol=1e-14, name="rope")
    assert torch.autograd.gradgradcheck(lambda t: apply_rope(t, cos, sin), (x,))
    bf16 = x.detach().to(torch.bfloat16)
    cos32, sin32 = rope_angles(torch.arange(5), 8, 10000.0)
    out = apply_rope(bf16, cos32, sin32)
    assert out.dtype == torch.bfloat16
    assert_close(out.double(), ref.detach(), rel_l2=1e-2, name="rope bf16")
