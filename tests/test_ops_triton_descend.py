"""The inner update in one Triton pass (tttlm.ops.triton_descend) against its reference,
tttlm.ttt.inner.descend's addcmul: bit for bit on a CPU (both one fused multiply-add), within
one rounding on a GPU (where ATen may round the product first), and against the exact fp64
value; what the kernel takes and refuses. The same for the update written in place where it
is finite, with the narrower copy of the new weights (a CUDA graph's buffers)."""

from __future__ import annotations

import pytest
import torch

from _helpers import triton_or_skip

triton = triton_or_skip()

from tttlm.ops.triton_descend import (  # noqa: E402
    triton_descend,
    triton_descend_,
    triton_descend_can_run,
    triton_descend_in_place_can_run,
)
from tttlm.ttt.inner import descend, descend_, per_sequence  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP = 2.0 ** -23  # fp32's relative spacing


def _inputs(shape: tuple[int, ...], g_dtype: torch.dtype, seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen).to(DEVICE)
    g = (torch.randn(*shape, generator=gen) * 3).to(DEVICE, g_dtype)
    coef = -torch.rand(shape[0], generator=gen).to(DEVICE)  # -(η·clip scale), per sequence
    return w, g, coef


def _assert_within_one_rounding(out: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                                coef: torch.Tensor) -> None:
    """|out - ref| within one fp32 rounding of the terms, ref both addcmul and the exact
    value: a fused multiply-add and a product rounded before the sum are both allowed."""
    c = per_sequence(coef, w)
    exact = w.double() + g.double() * c.double()
    scale = (w.double().abs() + (g.double() * c.double()).abs()) * ULP
    assert ((out.double() - exact).abs() <= scale).all()
    ref = torch.addcmul(w, g, c)
    assert ((out.double() - ref.double()).abs() <= 2 * scale).all()


@pytest.mark.parametrize("g_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4099), (3, 37, 53), (2, 5, 7, 9)])
def test_triton_descend_equals_addcmul(shape: tuple[int, ...], g_dtype: torch.dtype) -> None:
    """Sizes that do not fill the last block; one to three sequences; 1-D to 3-D rows."""
    w, g, coef = _inputs(shape, g_dtype)
    assert triton_descend_can_run(w, g, coef)
    out = triton_descend(w, g, coef)
    assert out.shape == w.shape and out.dtype == torch.float32
    _assert_within_one_rounding(out, w, g, coef)
    if DEVICE == "cpu":  # one rounding each: addcmul's bits
        assert torch.equal(out, torch.addcmul(w, g, per_sequence(coef, w)))


def test_triton_descend_leaves_its_inputs_alone() -> None:
    w, g, coef = _inputs((2, 300), torch.bfloat16)
    before = (w.clone(), g.clone(), coef.clone())
    triton_descend(w, g, coef)
    assert all(torch.equal(a, b) for a, b in zip((w, g, coef), before))


def test_triton_descend_refuses_what_it_does_not_take() -> None:
    w, g, coef = _inputs((2, 6, 8), torch.bfloat16)
    assert not triton_descend_can_run(w.double(), g, coef)  # fp64 weights: the reference
    assert not triton_descend_can_run(w, g[:, :3], coef)  # shapes differ
    assert not triton_descend_can_run(w, g, coef[:1])  # a factor per sequence
    assert not triton_descend_can_run(w.transpose(1, 2), g.transpose(1, 2), coef)  # strided
    assert not triton_descend_can_run(w[:, :0], g[:, :0], coef)  # nothing to update
    leaf = w.clone().requires_grad_(True)
    assert not triton_descend_can_run(leaf, g, coef)  # an outer gradient through W
    with torch.no_grad():
        assert triton_descend_can_run(leaf, g, coef)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dispatch takes CUDA tensors")
def test_descend_takes_the_kernel_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from tttlm.ops import triton_descend as kernel

    calls = []
    real = kernel.triton_descend
    monkeypatch.setattr(kernel, "triton_descend", lambda *a: calls.append(1) or real(*a))
    w, g, coef = _inputs((2, 33, 17), torch.bfloat16)
    fast, grads = [w, w[:, :2].contiguous()], [g, g[:, :2].contiguous()]
    outs = descend(fast, grads, coef)
    assert len(calls) == 2
    for out, a, b in zip(outs, fast, grads, strict=True):
        _assert_within_one_rounding(out, a, b, coef)


def test_descend_off_a_gpu_is_addcmul() -> None:
    """CPU tensors keep ATen's addcmul (the official step's parity tests run there)."""
    w, g, coef = (t.cpu() for t in _inputs((2, 33, 17), torch.bfloat16))
    (out,) = descend([w], [g], coef)
    assert torch.equal(out, torch.addcmul(w, g, per_sequence(coef, w)))


@pytest.mark.parametrize("low_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 4099), (3, 37, 53)])
def test_triton_descend_in_place_writes_the_finite_sequences_only(
        shape: tuple[int, ...], low_dtype: torch.dtype | None) -> None:
    """Sequences 0 and 2 take the update (addcmul's bits on a CPU, one rounding on a GPU),
    sequence 1 keeps its weights and its copy; the copy is the new weights cast (a cast
    rounds to nearest even on both)."""
    w, g, coef = _inputs(shape, torch.bfloat16)
    ok = torch.tensor([True, False, True], device=DEVICE)
    low = None if low_dtype is None else (w + 1).to(low_dtype)  # (not yet w's copy)
    before_w, before_low = w.clone(), None if low is None else low.clone()
    assert triton_descend_in_place_can_run(w, g, coef, low)
    triton_descend_(w, g, coef, ok, low)
    taken = torch.addcmul(before_w, g, per_sequence(coef, before_w))
    for b in (0, 2):
        _assert_within_one_rounding(w[b:b + 1], before_w[b:b + 1], g[b:b + 1], coef[b:b + 1])
        if DEVICE == "cpu":
            assert torch.equal(w[b], taken[b])
        if low is not None:
            assert torch.equal(low[b], w[b].to(low_dtype))
    assert torch.equal(w[1], before_w[1])
    if low is not None and before_low is not None:
        assert torch.equal(low[1], before_low[1])


@pytest.mark.skipif(DEVICE == "cuda", reason="the kernel on CPU tensors needs the interpreter "
                    "(a GPU runs it compiled; the test above checks it there)")
def test_descend_in_place_reference_equals_the_kernel() -> None:
    """descend_'s path off a GPU (addcmul and two selects) and the kernel give the same bits
    on a CPU, with and without the copy; NaN gradients of a dropped sequence go nowhere."""
    w, g, coef = (t.cpu() for t in _inputs((2, 5, 300), torch.bfloat16))
    g[1, 0, 0] = float("nan")
    # halfway between two bf16 values (to even: down, up, down), and near the largest fp32
    w[0, 0, :4] = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 3.0e38])
    g[0, 0, :4] = 0
    ok = torch.tensor([True, False])
    for with_low in (False, True):
        a, b = w.clone(), w.clone()
        low_a = a.to(torch.bfloat16) if with_low else None
        low_b = b.to(torch.bfloat16) if with_low else None
        descend_([a], [g], coef, ok, None if low_a is None else [low_a])
        triton_descend_(b, g, coef, ok, low_b)
        assert torch.equal(a, b) and torch.isfinite(a).all()
        assert torch.equal(a[1], w[1])
        if low_a is not None and low_b is not None:
            assert torch.equal(low_a, low_b)
            assert torch.equal(low_a, a.to(torch.bfloat16))
            assert low_b[0, 0, :3].tolist() == [1.0, 1 + 2.0 ** -6, -1.0]


def test_triton_descend_in_place_refuses_what_it_does_not_take() -> None:
    w, g, coef = _inputs((2, 6, 8), torch.bfloat16)
    low = w.to(torch.bfloat16)
    assert triton_descend_in_place_can_run(w, g, coef, low)
    assert not triton_descend_in_place_can_run(w, g, coef, low[:, :3])  # shapes differ
    assert not triton_descend_in_place_can_run(w, g, coef, low.transpose(1, 2))  # strided
    assert not triton_descend_in_place_can_run(w, g, coef, w.double())  # fp64 copy
    assert not triton_descend_in_place_can_run(w.double(), g, coef, None)
