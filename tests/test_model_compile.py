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


def _matmul_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of the matrix products (the profiler counts mm, addmm, bmm) of a forward without
    an outer gradient."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof, torch.no_grad():
        model(x, labels=y)
    return sum(e.flops or 0 for e in prof.events())


@pytest.mark.parametrize("variant, ttt, modes", [
    ("e2e", True, ("none", "first_order", "exact")),
    ("e2e", False, ("exact",)),
    ("full", False, ("exact",)),
], ids=["e2e-meta", "e2e-pretrain", "full"])
def test_compiled_blocks_match_eager(variant: str, ttt: bool, modes: tuple[str, ...]) -> None:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from tttlm.ops import linear_nll as head
    from tttlm.ops import rope

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
        if mode == "none":
            # Without an outer gradient, the compiled chunks do no more matmul work than the
            # eager ones, which autograd prunes to the fast weights' gradients: a compiled
            # region's backward would also compute every frozen weight's (15% more matmul
            # work here, over a third of the TTT blocks' backward products at 3b) if the
            # weights required grad inside it (model.constant_parameters).
            model.compile_blocks = False
            eager_flops = _matmul_flops(model, x, y)
            model.compile_blocks = True
            assert _matmul_flops(model, x, y) <= eager_flops
            assert all(p.requires_grad for p in model.parameters())
    # The compiled path really ran, and layers shared their graphs (no recompile per layer):
    # at most 12 graphs of block code, plus one each for the head's elementwise functions
    # compiled in these modes (linear_nll's _stats, _dlogits and _second; the inner-step
    # head's nll_and_dlogits), each compiled once for all shapes (dynamic), plus the TTT
    # chunks' frozen attention operands (rope.frozen_chunk_operands, "none" mode only): one
    # function for all layers, a graph per kind of cache (short of the window, equal to the
    # chunk's length, dropping rows) and per gradient need (the last chunk takes no step).
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    head_graphs = head._compiled.cache_info().currsize if variant == "e2e" and ttt else 0
    operand_graphs = len(_debug_get_cache_entry_list(rope._frozen_operands.__code__))
    assert head_graphs <= 4
    assert operand_graphs <= 4 and (operand_graphs > 0) == (variant == "e2e" and ttt)
    assert 0 < graphs - head_graphs - operand_graphs <= 12


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


@pytest.mark.parametrize("past, c, keep", [(0, 4, 12), (8, 4, 12), (12, 4, 12), (10, 3, 12)])
def test_frozen_chunk_operands_eager_and_compiled(past: int, c: int, keep: int) -> None:
    """The TTT chunk's operands over a frozen cache: eager equal to rotating cache ⊕ chunk as
    a whole (RoPE is per row) and keeping its last ``keep`` raw rows; compiled equal to eager
    (fp64), gradients of the chunk's q, k, v included."""
    from tttlm.ops.rope import frozen_chunk_operands

    g = torch.Generator().manual_seed(past + c)
    B, H, d = 2, 3, 8
    cos, sin = rope_angles(torch.arange(past + c), d, 10000.0, torch.float64)
    keys, values = (torch.randn(B, past, H, d, generator=g, dtype=torch.float64)
                    for _ in range(2))
    q, k, v = (torch.randn(B, c, H, d, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    whole = torch.cat((keys, k), 1)
    want = (apply_rope(q, cos[past:], sin[past:]), apply_rope(whole, cos, sin),
            torch.cat((values, v), 1), whole[:, -keep:])
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want]
    want_grads = torch.autograd.grad(sum((t * x).sum() for t, x in zip(want, w)), (q, k, v))
    for compiled in (False, True):
        got = frozen_chunk_operands(q, keys, k, values, v, cos, sin, keep, compiled)
        for name, a, e in zip(("q", "keys", "values", "next keys"), got, want, strict=True):
            if compiled:
                assert_close(a, e, atol=1e-12, name=name)
            else:
                assert torch.equal(a, e), name
        grads_ = torch.autograd.grad(sum((t * x).sum() for t, x in zip(got, w)), (q, k, v))
        for name, a, e in zip("qkv", grads_, want_grads):
            assert_close(a, e, atol=1e-12, name=f"d{name}")


def test_frozen_compiled_forward_casts_the_head_weight_once() -> None:
    """Autocast keeps its bf16 copy of a weight for the whole forward only while the weight
    requires grad: the frozen chunks make only the TTT blocks' weights constant, so the tied
    head (the largest weight) is cast once, not once per chunk."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model(dtype=torch.float32)
    model.compile_blocks = True
    x, y = tokens(model, 2, 40)
    shape = list(model.embed.weight.shape)

    def forward() -> None:
        with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
            model(x, labels=y)

    forward()  # compiles outside the profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        forward()
    casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
             and list(e.input_shapes[0]) == shape]
    assert len(casts) == 1
    assert all(p.requires_grad for p in model.parameters())
