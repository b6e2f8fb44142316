"""The memory-lean head + NLL against the naive reference: values, gradients, gradients of
gradients (float64 gradcheck/gradgradcheck and a comparison of second-order terms)."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close
from tttlm.ops.linear_nll import linear_nll, naive_linear_nll


def _inputs(dtype: torch.dtype, N: int = 7, D: int = 5, V: int = 11):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(V, D, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    return x, W, y


def test_gradcheck_and_gradgradcheck_float64() -> None:
    x, W, y = _inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: linear_nll(a, b, y), (x, W))
    assert torch.autograd.gradgradcheck(lambda a, b: linear_nll(a, b, y), (x, W))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("block_rows", [None, 3], ids=["one-block", "row-blocks"])
def test_matches_naive_to_second_order(dtype: torch.dtype, tol: float, block_rows: int | None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantity the meta-gradient needs: d/dθ of a function of d(loss)/d(x, W); also when
    the logits are formed a few rows at a time (7 rows in blocks of 3)."""
    from tttlm.ops import linear_nll as module

    if block_rows is not None:
        monkeypatch.setattr(module, "MAX_BLOCK_ELEMENTS", block_rows * 11)
        assert len(module._row_blocks(7, 11)) == 3
    results = []
    for fn in (linear_nll, naive_linear_nll):
        x, W, y = _inputs(dtype)
        w = torch.linspace(0.5, 1.5, y.numel(), dtype=dtype)
        nll = fn(x, W, y)
        gx, gW = torch.autograd.grad((nll * w).sum(), (x, W), create_graph=True)
        second = (gx.pow(2).sum() + (gW * torch.cos(W)).sum())
        hx, hW = torch.autograd.grad(second, (x, W))
        results.append((nll, gx, gW, hx, hW))
    for name, a, b in zip(("nll", "dx", "dW", "d2x", "d2W"), *results):
        assert_close(a, b, rel_l2=tol, name=name)


def test_batched_shape_and_autocast_cpu() -> None:
    x, W, y = _inputs(torch.float32, N=12)
    out = linear_nll(x.view(3, 4, -1), W, y.view(3, 4))
    assert out.shape == (3, 4)
    assert_close(out, naive_linear_nll(x, W, y).view(3, 4), rel_l2=1e-6, name="batched")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = linear_nll(x, W, y)
        ref = naive_linear_nll(x, W, y)
    assert lean.dtype == torch.float32
    assert_close(lean, ref, rel_l2=1e-6, name="autocast bf16")


def test_frozen_head_skips_its_gradient() -> None:
    x, W, y = _inputs(torch.float64)
    frozen = W.detach()
    gx, = torch.autograd.grad(linear_nll(x, frozen, y).sum(), (x,), create_graph=True)
    ref, = torch.autograd.grad(naive_linear_nll(x, frozen, y).sum(), (x,), create_graph=True)
    assert_close(gx, ref, atol=1e-12, name="dx")
    hx, = torch.autograd.grad(gx.pow(2).sum(), (x,))
    href, = torch.autograd.grad(ref.pow(2).sum(), (x,))
    assert_close(hx, href, atol=1e-12, name="d2x")


def test_inner_steps_skip_the_head_weight_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the meta forward the inner gradient needs no dW; the outer backward does."""
    from _helpers import grads, tiny_model, tokens
    from tttlm.ops import linear_nll as module

    seen: list[bool] = []
    original = module._LinearNLLBackward.forward

    def spy(ctx, x, W, labels, lse, g, mm, need_dW, *rest):  # type: ignore[no-untyped-def]
        seen.append(need_dW)
        return original(ctx, x, W, labels, lse, g, mm, need_dW, *rest)

    model = tiny_model()
    x, y = tokens(model, 2, 12)  # three chunks of 4: two inner steps
    monkeypatch.setattr(module._LinearNLLBackward, "forward", staticmethod(spy))
    model(x, labels=y).loss.backward()
    assert seen == [False, False, True, True, True]
    assert grads(model)["embed.weight"].abs().sum() > 0


@pytest.mark.parametrize("block_rows", [None, 3], ids=["one-block", "row-blocks"])
def test_inner_step_head_matches_naive(block_rows: int | None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner step's head (dx formed in the forward, scaled by each row's upstream in the
    backward) against autograd through the materialised logits, float64: values and dx for
    per-row weights as a masked per-sequence mean gives them; no gradient reaches W."""
    from tttlm.ops import linear_nll as module

    if block_rows is not None:
        monkeypatch.setattr(module, "MAX_BLOCK_ELEMENTS", block_rows * 11)
    x, W, y = _inputs(torch.float64)
    w = torch.tensor([0.5, 0.0, 1.5, 0.25, 1.0, 2.0, 0.75], dtype=torch.float64)
    nll = module.linear_nll_inner_step(x, W, y)
    gx, = torch.autograd.grad((nll * w).sum(), (x,))
    x2 = x.detach().requires_grad_(True)
    ref = naive_linear_nll(x2, W.detach(), y)
    rx, = torch.autograd.grad((ref * w).sum(), (x2,))
    assert_close(nll, ref, rel_l2=1e-13, name="nll")
    assert_close(gx, rx, rel_l2=1e-13, name="dx")
    assert gx[1].abs().max() == 0  # a row of weight 0 (masked) gets nothing
    assert W.grad is None
    batched = module.linear_nll_inner_step(x.view(7, 1, -1), W, y.view(7, 1))
    assert batched.shape == (7, 1)
    assert torch.equal(batched.view(-1), nll)


def test_inner_step_head_under_autocast_matches_lean_head() -> None:
    """bf16 autocast: the NLL is the lean head's bit for bit (the same logits and softmax);
    dx equal up to where each row's upstream scales it (before or after the bf16 cast)."""
    from tttlm.ops.linear_nll import linear_nll_inner_step

    x, W, y = _inputs(torch.float32, N=12, D=16, V=40)
    w = torch.linspace(0.1, 1.0, 12)
    outs = []
    for fn in (linear_nll_inner_step, linear_nll):
        xi = x.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = fn(xi, W.detach(), y)
        gx, = torch.autograd.grad((nll * w).sum(), (xi,))
        outs.append((nll, gx))
    assert torch.equal(outs[0][0], outs[1][0])
    assert_close(outs[0][1], outs[1][1], rel_l2=1e-2, name="dx bf16")


def test_compiled_elementwise_work_matches_eager_to_second_order() -> None:
    """``compiled=True`` (the head's softmax work fused by torch.compile, as on a GPU with
    compiled blocks): the same NLL, first and second derivatives as the eager ops, float64,
    in row blocks; the inner-step head too."""
    from tttlm.ops import linear_nll as module

    module._compiled.cache_clear()
    results = []
    for compiled in (False, True):
        x, W, y = _inputs(torch.float64, N=9, D=6, V=13)
        w = torch.linspace(0.5, 1.5, y.numel(), dtype=torch.float64)
        nll = linear_nll(x, W, y, compiled)
        gx, gW = torch.autograd.grad((nll * w).sum(), (x, W), create_graph=True)
        hx, hW = torch.autograd.grad(gx.pow(2).sum() + (gW * torch.cos(W)).sum(), (x, W))
        x2 = x.detach().requires_grad_(True)
        inner = module.linear_nll_inner_step(x2, W.detach(), y, compiled)
        ix, = torch.autograd.grad((inner * w).sum(), (x2,))
        results.append((nll, gx, gW, hx, hW, inner, ix))
    assert module._compiled.cache_info().currsize == 4  # the four functions ran compiled
    for name, a, b in zip(("nll", "dx", "dW", "d2x", "d2W", "inner nll", "inner dx"),
                          *results):
        assert_close(b, a, rel_l2=1e-12, name=name)
