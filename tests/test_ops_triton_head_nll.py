"""The inner step's head kernel (tttlm.ops.triton_head_nll): the NLL and ``softmax − one-hot``
from the logits in one pass pair, against the reference tttlm.ops.linear_nll.nll_and_dlogits
and the exact fp64 values; rows shorter and longer than the kernel's block, strided rows,
large logits; what it refuses. On a GPU, the inner-step head that dispatches to it against
the naive head, values and gradients."""

from __future__ import annotations

import pytest
import torch

from _helpers import triton_or_skip

triton = triton_or_skip()

from tttlm.ops import triton_head_nll  # noqa: E402
from tttlm.ops.linear_nll import (  # noqa: E402
    linear_nll_inner_step,
    naive_linear_nll,
    nll_and_dlogits,
)
from tttlm.ops.triton_head_nll import nll_dlogits, nll_dlogits_can_run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _logits(n: int, V: int, dtype: torch.dtype, scale: float, seed: int = 0,
            width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, width or V, generator=gen) * scale).to(DEVICE, dtype)[:, :V]
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[0], labels[-1] = 0, V - 1  # the row's first and last logit
    return z, labels.to(DEVICE)


def _exact(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zd = z.double()
    lse = torch.logsumexp(zd, -1)
    p = (zd - lse[:, None]).exp()
    p[torch.arange(len(labels)), labels] -= 1.0
    return lse - zd.gather(1, labels[:, None]).squeeze(1), p


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "V", "scale"), [(3, 300, 1.0), (5, 2 * triton_head_nll.BLOCK + 7,
                                                                  4.0), (4, 5003, 30.0)])
def test_nll_dlogits_matches_reference_and_exact(n: int, V: int, scale: float,
                                                 dtype: torch.dtype) -> None:
    """Shorter than one block, two blocks and a few logits, logits up to ~±100 (bf16/fp16
    overflow nothing there: ±30 standard deviations stay far below 65504)."""
    z, labels = _logits(n, V, dtype, scale)
    assert nll_dlogits_can_run(z, labels, torch.float32)
    nll, dz = nll_dlogits(z, labels)
    assert nll.dtype == torch.float32 and dz.dtype == dtype and dz.shape == z.shape
    exact_nll, exact_dz = _exact(z, labels)
    ref_nll, ref_dz = nll_and_dlogits(z, labels, torch.float32)
    # The NLL: a few fp32 roundings of the log-sum-exp's size, as the reference's own error.
    lse_size = exact_nll.abs() + z.double().abs().amax(-1) + 1.0
    assert ((nll.double() - exact_nll).abs() <= 8 * EPS[torch.float32] * lse_size).all()
    assert ((ref_nll.double() - exact_nll).abs() <= 8 * EPS[torch.float32] * lse_size).all()
    # The gradient: within one rounding of its dtype of the exact value (the fp32 work before
    # the final rounding is ~1e-6 relative), and so within two of the reference's.
    bound = EPS[dtype] * exact_dz.abs() + 4e-6 * (exact_dz.abs() + 1e-30) + 1e-12
    if dtype == torch.float32:
        bound = 64 * EPS[dtype] * exact_dz.abs() + 1e-12
    tiny = torch.finfo(dtype).tiny * 2  # (subnormals of the narrow dtypes: absolute)
    assert ((dz.double() - exact_dz).abs() <= bound + tiny).all()
    assert ((dz.double() - ref_dz.double()).abs() <= 2 * bound + tiny).all()
    # The label's entry is p − 1: negative, the others non-negative, each row sums to ~0.
    assert (dz[torch.arange(n), labels] < 0).all()
    mask = torch.ones_like(dz, dtype=torch.bool)
    mask[torch.arange(n), labels] = False
    assert (dz[mask] >= 0).all()


def test_nll_dlogits_strided_rows() -> None:
    """Rows of a wider buffer (a row stride past V) read as they lie; the gradient comes
    back contiguous."""
    z, labels = _logits(4, 3001, torch.bfloat16, 2.0, width=3100)
    assert not z.is_contiguous() and nll_dlogits_can_run(z, labels, torch.float32)
    nll, dz = nll_dlogits(z, labels)
    nll_c, dz_c = nll_dlogits(z.contiguous(), labels)
    assert dz.is_contiguous()
    assert torch.equal(nll, nll_c) and torch.equal(dz, dz_c)


def test_nll_dlogits_refuses() -> None:
    z, labels = _logits(3, 100, torch.bfloat16, 1.0)
    f32 = torch.float32
    assert not nll_dlogits_can_run(z, labels, torch.float64)  # fp64 statistics: the reference
    assert not nll_dlogits_can_run(z.double(), labels, f32)
    assert not nll_dlogits_can_run(z[None], labels, f32)
    assert not nll_dlogits_can_run(z.mT, labels, f32)  # columns not contiguous
    assert not nll_dlogits_can_run(z, labels[:2], f32)
    assert not nll_dlogits_can_run(z[:0], labels[:0], f32)
    zg = z.float().requires_grad_()
    assert not nll_dlogits_can_run(zg, labels, f32)
    with torch.no_grad():
        assert nll_dlogits_can_run(zg, labels, f32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the head dispatches to it on CUDA")
def test_inner_step_head_on_cuda_matches_naive() -> None:
    """``linear_nll_inner_step`` (what a prefill's inner step runs) through the kernel under
    bf16 autocast: the NLL and the gradient with respect to the hidden states against the
    naive head's, which autograd derives from the kept logits."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 96, generator=gen).cuda().requires_grad_()
    W = (torch.randn(5003, 96, generator=gen) * 0.1).cuda()
    labels = torch.randint(0, 5003, (2, 64), generator=gen).cuda()
    g = torch.rand(2, 64, generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        nll = linear_nll_inner_step(x, W, labels)
        (dx,) = torch.autograd.grad((nll * g).sum(), x)
        ref = naive_linear_nll(x, W, labels)
        (ref_dx,) = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    # (the bf16 gradient of the logits, then a bf16 product: within bf16's resolution)
    torch.testing.assert_close(dx, ref_dx, rtol=2e-2, atol=2e-3)
