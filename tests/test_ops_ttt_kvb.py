"""TTT-KVB's dual form (:func:`ttt_kvb`) against its definition (:func:`ttt_kvb_naive`, autograd
per token): outputs, final fast weights and every outer gradient, float64."""

from __future__ import annotations

import pytest
import torch

from tttlm.ops.ttt_kvb import (
    ttt_kvb,
    ttt_kvb_continue,
    ttt_kvb_mlp,
    ttt_kvb_mlp_continue,
    ttt_kvb_mlp_naive,
    ttt_kvb_naive,
)


def inputs(B: int, H: int, T: int, d: int, seed: int = 0, mlp: int | None = None) -> tuple:
    """Random float64 arguments: q, k, v, eta, the fast weights (``W, b`` spread out; with
    ``mlp`` = m, a tuple ``(W1 [d, m], b1, W2 [m, d], b2)``), gamma, beta."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        x = shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)
        return x.requires_grad_()

    q, k, v = rand(B, H, T, d), rand(B, H, T, d), rand(B, H, T, d)
    eta = (0.5 * torch.rand(B, H, T, generator=g, dtype=torch.float64)).requires_grad_()
    if mlp is None:
        return (q, k, v, eta, rand(H, d, d, scale=0.3), rand(H, d, scale=0.1),
                rand(H, d, scale=0.1, shift=1.0), rand(H, d, scale=0.1))
    fast = (rand(H, d, mlp, scale=0.4), rand(H, mlp, scale=0.1), rand(H, mlp, d, scale=0.4),
            rand(H, d, scale=0.1))
    return q, k, v, eta, fast, rand(H, d, scale=0.1, shift=1.0), rand(H, d, scale=0.1)


@pytest.mark.parametrize("T, chunk", [(11, 4), (8, 4), (5, 8), (7, 1)])
def test_dual_form_is_the_definition(T: int, chunk: int) -> None:
    args = inputs(2, 3, T, 5)
    fast = ttt_kvb(*args, chunk=chunk)
    slow = ttt_kvb_naive(*args, chunk=chunk)
    for a, b, name in zip(fast, slow, ("out", "weight", "bias")):
        torch.testing.assert_close(a, b.expand_as(a), rtol=0, atol=1e-12, msg=name)
    g = torch.Generator().manual_seed(9)
    probes = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in fast]

    def total(out: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return sum((t * p).sum() for t, p in zip(out, probes))  # type: ignore[return-value]

    grads_fast = torch.autograd.grad(total(fast), args)
    grads_slow = torch.autograd.grad(total(slow), args)
    for i, (a, b) in enumerate(zip(grads_fast, grads_slow)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"grad of input {i}")


def test_learning_happens_and_is_causal() -> None:
    q, k, v, eta, w, b, gamma, beta = inputs(1, 2, 12, 4)
    out, w_end, _ = ttt_kvb(q, k, v, eta, w, b, gamma, beta, chunk=4)
    # no learning rate: every token reads the initial weights
    frozen, w_same, _ = ttt_kvb(q, k, v, torch.zeros_like(eta), w, b, gamma, beta, chunk=4)
    assert torch.equal(w_same, w.detach().expand_as(w_same))
    assert (out - frozen).abs().max() > 1e-3 and (w_end - w).abs().max() > 1e-3
    # a change at token 9 leaves tokens 0..8 as they were
    v2 = v.detach().clone()
    v2[:, :, 9] += 1.0
    out2, _, _ = ttt_kvb(q, k, v2, eta, w, b, gamma, beta, chunk=4)
    assert torch.equal(out2[:, :, :9], out[:, :, :9])
    assert (out2[:, :, 9:] - out[:, :, 9:]).abs().max() > 1e-6


def test_gradcheck() -> None:
    args = inputs(1, 1, 6, 3, seed=4)
    assert torch.autograd.gradcheck(lambda *a: ttt_kvb(*a, chunk=4)[0], args)


@pytest.mark.parametrize("prefix, spans", [(5, [3, 4, 1, 3]), (8, [1] * 9), (1, [3, 4, 4, 4, 2])])
def test_continuing_equals_the_whole_sequence(prefix: int, spans: list[int]) -> None:
    """A prefix read at once, then the rest in pieces that never cross a chunk boundary
    (decoding: one token at a time), gives the whole sequence's outputs and weights."""
    chunk, T = 4, prefix + sum(spans)
    q, k, v, eta, w, b, gamma, beta = (t.detach() for t in inputs(2, 3, T, 5))
    whole, w_end, b_end = ttt_kvb(q, k, v, eta, w, b, gamma, beta, chunk)
    out, w_now, b_now, w_start, b_start = ttt_kvb(q[:, :, :prefix], k[:, :, :prefix],
                                                  v[:, :, :prefix], eta[:, :, :prefix], w, b,
                                                  gamma, beta, chunk, last_start=True)
    outs, t = [out], prefix
    for n in spans:
        if t % chunk == 0:  # a new chunk starts: its gradients are taken at these weights
            w_start, b_start = w_now, b_now
        assert t // chunk == (t + n - 1) // chunk, "a span must stay in one chunk"
        part = slice(t, t + n)
        out, w_now, b_now = ttt_kvb_continue(q[:, :, part], k[:, :, part], v[:, :, part],
                                             eta[:, :, part], w_start, b_start, w_now, b_now,
                                             gamma, beta)
        outs.append(out)
        t += n
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(w_now, w_end, rtol=0, atol=1e-12)
    torch.testing.assert_close(b_now, b_end, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T, chunk", [(11, 4), (6, 8)])
def test_mlp_dual_form_is_the_definition(T: int, chunk: int) -> None:
    q, k, v, eta, weights, gamma, beta = inputs(2, 3, T, 4, mlp=8)
    out, now, _ = ttt_kvb_mlp(q, k, v, eta, weights, gamma, beta, chunk)
    ref, ref_now = ttt_kvb_mlp_naive(q, k, v, eta, weights, gamma, beta, chunk)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(now, ref_now):
        torch.testing.assert_close(a, b.expand_as(a), rtol=0, atol=1e-12)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    args = (q, k, v, eta, *weights, gamma, beta)
    fast = torch.autograd.grad((out * probe).sum() + sum(w.sum() for w in now), args)
    slow = torch.autograd.grad((ref * probe).sum() + sum(w.sum() for w in ref_now), args)
    for i, (a, b) in enumerate(zip(fast, slow)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"grad of input {i}")


def test_mlp_continuing_equals_the_whole_sequence() -> None:
    chunk, prefix, spans = 4, 6, [2, 1, 1, 1, 1, 4, 3]
    T = prefix + sum(spans)
    q, k, v, eta, weights, gamma, beta = (
        tuple(w.detach() for w in t) if isinstance(t, tuple) else t.detach()
        for t in inputs(1, 2, T, 4, seed=2, mlp=8))
    whole, end, _ = ttt_kvb_mlp(q, k, v, eta, weights, gamma, beta, chunk)
    out, now, start = ttt_kvb_mlp(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix],
                                  eta[:, :, :prefix], weights, gamma, beta, chunk)
    outs, t = [out], prefix
    for n in spans:
        if t % chunk == 0:
            start = now
        part = slice(t, t + n)
        out, now = ttt_kvb_mlp_continue(q[:, :, part], k[:, :, part], v[:, :, part],
                                        eta[:, :, part], start, now, gamma, beta)
        outs.append(out)
        t += n
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=0, atol=1e-12)
    for a, b in zip(now, end):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
