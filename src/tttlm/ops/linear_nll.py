"""Tied output head + per-token NLL without keeping ``[N, V]`` logits, differentiable twice.

In the meta forward pass every chunk's head is differentiated twice (the inner gradient, then the
outer gradient through it). Plain autograd keeps the logits, the log-softmax and the gradient of
the logits of every chunk — several ``[b, V]`` fp32 tensors per chunk, the largest part of the
activation memory at a vocabulary of 128K. Here the forward keeps only ``x``, ``W``, the labels and
the log-sum-exp; the backward recomputes the logits, and is itself an autograd function whose
backward recomputes them again.

Math, for ``z = x Wᵀ``, ``p = softmax(z)``, ``nll = lse(z) − z[y]``, upstream ``g = ∂L/∂nll``:
first order ``dz = g (p − Y)``, ``dx = dz W``, ``dW = dzᵀ x``. For the second order, with upstream
``(u_x, u_W)`` on ``(dx, dW)`` and ``M = u_x Wᵀ + x u_Wᵀ``:
``∂/∂g = Σ_v M (p − Y)``, ``dz₂ = g p (M − Σ_v p M)``, ``∂/∂x = dz₂ W + dz u_W``,
``∂/∂W = dz₂ᵀ x + dzᵀ u_x``.

The matmuls run in the autocast dtype when autocast is on (as ``x @ W.T`` would), the softmax
and everything per-token in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from tttlm.ops.loss import token_nll

# Set while an inner gradient (with respect to fast weights only) is taken: the head weight's
# gradient is then not wanted, but a custom Function's needs_input_grad cannot tell, since it is
# fixed when the forward runs. A plain global, not a thread-local: CUDA backward passes run on
# the autograd engine's own threads.
_SKIP_WEIGHT_GRAD = False


@contextlib.contextmanager
def head_weight_grad_unused() -> Iterator[None]:
    """Within this block, backward passes through :func:`linear_nll` skip ``dW``: for a
    gradient with respect to other tensors (the inner step's fast weights)."""
    global _SKIP_WEIGHT_GRAD
    previous, _SKIP_WEIGHT_GRAD = _SKIP_WEIGHT_GRAD, True
    try:
        yield
    finally:
        _SKIP_WEIGHT_GRAD = previous


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _probs(x: torch.Tensor, W: torch.Tensor, lse: torch.Tensor, mm: torch.dtype) -> torch.Tensor:
    """``softmax(x Wᵀ)`` from the saved log-sum-exp, in one fresh ``[N, V]`` buffer."""
    p = (x.to(mm) @ W.to(mm).mT).to(lse.dtype)  # a new tensor: safe to update in place
    return p.sub_(lse[:, None]).exp_()


def _minus_onehot_(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``p − Y`` in place."""
    return p.scatter_add_(1, labels[:, None], torch.full_like(p[:, :1], -1.0))


class _LinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                mm: torch.dtype) -> torch.Tensor:
        acc = _acc(x)
        z = (x.to(mm) @ W.to(mm).mT).to(acc)  # [N, V]
        lse = torch.logsumexp(z, dim=-1)
        nll = lse - z.gather(1, labels[:, None]).squeeze(1)
        ctx.save_for_backward(x, W, labels, lse)
        ctx.mm = mm
        return nll

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, W, labels, lse = ctx.saved_tensors
        need_dW = ctx.needs_input_grad[1] and not _SKIP_WEIGHT_GRAD
        dx, dW = _LinearNLLBackward.apply(x, W, labels, lse, g, ctx.mm, need_dW)
        return dx, dW, None, None


class _LinearNLLBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                lse: torch.Tensor, g: torch.Tensor, mm: torch.dtype,
                need_dW: bool) -> tuple[torch.Tensor, ...]:
        p = _probs(x, W, lse, mm)
        dz = _minus_onehot_(p, labels).mul_(g.to(p.dtype)[:, None]).to(mm)  # [N, V]
        dx = (dz @ W.to(mm)).to(x.dtype)
        # A frozen head (W not requiring grad) needs no [V, D] product.
        dW = (dz.mT @ x.to(mm)).to(W.dtype) if need_dW else None
        ctx.save_for_backward(x, W, labels, lse, g)
        ctx.mm = mm
        return dx, dW

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, u_x: torch.Tensor | None,
                 u_W: torch.Tensor | None) -> tuple[Any, ...]:
        x, W, labels, lse, g = ctx.saved_tensors
        need_x, need_W, need_g = (ctx.needs_input_grad[i] for i in (0, 1, 4))
        mm = ctx.mm
        xm, Wm = x.to(mm), W.to(mm)
        if u_x is None and u_W is None:
            return None, None, None, None, None, None, None
        # M = u_x Wᵀ + x u_Wᵀ as one product over the concatenated inner dimension.
        if u_x is not None and u_W is not None:
            M = torch.cat((u_x.to(mm), xm), -1) @ torch.cat((Wm, u_W.to(mm)), -1).mT
        elif u_x is not None:
            M = u_x.to(mm) @ Wm.mT
        else:
            M = xm @ u_W.to(mm).mT  # type: ignore[union-attr]
        p = _probs(x, W, lse, mm)
        acc = p.dtype
        M = M.to(acc)
        ga = g.to(acc)[:, None]
        s = torch.einsum("nv,nv->n", M, p)  # Σ_v p M, without an [N, V] product
        grad_g = (s - M.gather(1, labels[:, None]).squeeze(1)).to(g.dtype) if need_g else None
        grad_x = grad_W = None
        if need_x or need_W:
            dz2 = M.sub_(s[:, None]).mul_(p).mul_(ga).to(mm)  # g p (M − Σ p M); M is spent
            dz = _minus_onehot_(p, labels).mul_(ga).to(mm)  # g (p − Y); p is spent
            if need_x:
                grad_x = dz2 @ Wm
                if u_W is not None:
                    grad_x = grad_x + dz @ u_W.to(mm)
                grad_x = grad_x.to(x.dtype)
            if need_W:
                grad_W = dz2.mT @ xm
                if u_x is not None:
                    grad_W = grad_W + dz.mT @ u_x.to(mm)
                grad_W = grad_W.to(W.dtype)
        return grad_x, grad_W, None, None, grad_g, None, None


def linear_nll(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``token_nll(x @ weight.T, labels)`` for ``x [..., D]``, ``weight [V, D]`` → ``[...]``."""
    shape = x.shape[:-1]
    nll = _LinearNLL.apply(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1),
                           _matmul_dtype(x))
    return nll.view(shape)


def naive_linear_nll(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference: materialise the logits and let autograd keep what it needs."""
    return token_nll(x @ weight.mT, labels)
