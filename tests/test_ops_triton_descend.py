"""The inner update in one Triton pass (tttlm.ops.triton_descend) against its reference,
tttlm.ttt.inner.descend's addcmul: bit for bit on a CPU (both one fused multiply-add), within
one rounding on a GPU (where ATen may round the product first), and against the exact fp64
value; what the kernel takes and refuses."""

from __future__ import annotations

import pytest
import torch

from _helpers import triton_or_skip

triton = triton_or_skip()

from tttlm.ops.triton_descend import triton_descend, triton_descend_can_run  # noqa: E402
from tttlm.ttt.inner import descend, per_sequence  # noqa: E402

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
