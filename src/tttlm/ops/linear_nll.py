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
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from tttlm.ops.compiled import inductor_compile
from tttlm.ops.loss import token_nll
from tttlm.ops.triton_runtime import triton_available

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


def _autocast_casts(W: torch.Tensor, mm: torch.dtype) -> bool:
    """Whether autocast is on for W's device and casts to ``mm``: products then take W as it
    is and get autocast's (cached) cast, the same values as ``W.to(mm)``."""
    kind = W.device.type
    return (W.dtype != mm and torch.is_autocast_enabled(kind)
            and torch.get_autocast_dtype(kind) == mm)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _minus_onehot_(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``p − Y`` in place."""
    if torch.compiler.is_compiling():
        # Compiled: a comparison, which fuses into the surrounding elementwise pass (a scatter
        # would split it, p written out and read back); p − 1 and p − 0 as the scatter gives.
        onehot = torch.arange(p.shape[-1], device=p.device) == labels[:, None]
        return p.sub_(onehot.to(p.dtype))
    return p.scatter_add_(1, labels[:, None], torch.full_like(p[:, :1], -1.0))


# The elementwise work over one row block's [n, V] logits, between the products with the head.
# Each is run as it is or compiled (``compiled``: fused by Inductor into a pass or two over
# the logits, instead of one pass per operation, in fp32, over up to 1 GiB per block).
def _stats(z: torch.Tensor, labels: torch.Tensor, acc: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sum-exp and the NLL ``[n]`` of the logits ``z [n, V]``."""
    zf = z.to(acc)
    lse = torch.logsumexp(zf, dim=-1)
    return lse, lse - zf.gather(1, labels[:, None]).squeeze(1)


def _probs(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``softmax(z)`` from the saved log-sum-exp. ``z`` is a fresh product, overwritten when
    it is in ``lse``'s dtype already (eager: one ``[n, V]`` buffer; compiled code does not
    write into its inputs, which would cost a copy back)."""
    if torch.compiler.is_compiling():
        return (z.to(lse.dtype) - lse[:, None]).exp()
    return z.to(lse.dtype).sub_(lse[:, None]).exp_()


def _dlogits(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, g: torch.Tensor,
             mm: torch.dtype) -> torch.Tensor:
    """``g (p − Y)`` in ``mm``: the logits' gradient for upstream ``g [n]``."""
    p = _probs(z, lse)
    return _minus_onehot_(p, labels).mul_(g.to(p.dtype)[:, None]).to(mm)


def _second(M: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
            g: torch.Tensor, mm: torch.dtype, want_dz: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """For ``M = u_x Wᵀ + x u_Wᵀ``: the gradient of ``g`` (``Σ p M − M[y]``) and, with
    ``want_dz``, ``dz₂ = g p (M − Σ p M)`` and ``dz = g (p − Y)`` in ``mm``."""
    p = _probs(z, lse)
    acc = p.dtype
    M = M.to(acc)
    ga = g.to(acc)[:, None]
    s = torch.einsum("nv,nv->n", M, p)  # Σ_v p M, without an [n, V] product
    grad_g = s - M.gather(1, labels[:, None]).squeeze(1)
    if not want_dz:
        return grad_g, None, None
    if torch.compiler.is_compiling():  # M may be the caller's tensor (see _probs)
        dz2 = ((M - s[:, None]) * p * ga).to(mm)
    else:
        dz2 = M.sub_(s[:, None]).mul_(p).mul_(ga).to(mm)  # g p (M − Σ p M); M is spent
    dz = _minus_onehot_(p, labels).mul_(ga).to(mm)  # g (p − Y); p is spent
    return grad_g, dz2, dz


@functools.cache
def _compiled(fn: Any) -> Any:
    return inductor_compile(fn, dynamic=True)


def _run(fn: Any, compiled: bool) -> Any:
    return _compiled(fn) if compiled else fn


class _LinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                mm: torch.dtype, compiled: bool) -> torch.Tensor:
        acc = _acc(x)
        Wm = W.to(mm)
        stats = _run(_stats, compiled)
        lse = x.new_empty(x.shape[0], dtype=acc)
        nll = x.new_empty(x.shape[0], dtype=acc)
        for rows in _row_blocks(x.shape[0], W.shape[0]):
            lse[rows], nll[rows] = stats(x[rows].to(mm) @ Wm.mT, labels[rows], acc)
        ctx.save_for_backward(x, W, labels, lse)
        ctx.mm, ctx.compiled = mm, compiled
        return nll

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, W, labels, lse = ctx.saved_tensors
        need_dW = ctx.needs_input_grad[1] and not _SKIP_WEIGHT_GRAD
        dx, dW = _LinearNLLBackward.apply(x, W, labels, lse, g, ctx.mm, need_dW, ctx.compiled)
        return dx, dW, None, None, None


class _LinearNLLBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                lse: torch.Tensor, g: torch.Tensor, mm: torch.dtype,
                need_dW: bool, compiled: bool) -> tuple[torch.Tensor, ...]:
        Wm = W.to(mm)
        dlogits = _run(_dlogits, compiled)
        dx = torch.empty_like(x)
        # A frozen head (W not requiring grad) needs no [V, D] product.
        dW = torch.zeros(W.shape, dtype=_acc(x), device=W.device) if need_dW else None
        for rows in _row_blocks(x.shape[0], W.shape[0]):
            dz = dlogits(x[rows].to(mm) @ Wm.mT, lse[rows], labels[rows], g[rows], mm)
            dx[rows] = (dz @ Wm).to(x.dtype)
            if dW is not None:
                dW += dz.mT @ x[rows].to(mm)
        dW = dW.to(W.dtype) if dW is not None else None
        ctx.save_for_backward(x, W, labels, lse, g)
        ctx.mm, ctx.compiled = mm, compiled
        return dx, dW

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, u_x: torch.Tensor | None,
                 u_W: torch.Tensor | None) -> tuple[Any, ...]:
        x, W, labels, lse, g = ctx.saved_tensors
        need_x, need_W, need_g = (ctx.needs_input_grad[i] for i in (0, 1, 4))
        mm = ctx.mm
        if u_x is None and u_W is None:
            return (None,) * 8
        second = _run(_second, ctx.compiled)
        Wm = W.to(mm)
        # [W, u_W] once, so that M = u_x Wᵀ + x u_Wᵀ is one product over the joined inner axis.
        right = torch.cat((Wm, u_W.to(mm)), -1) if u_W is not None and u_x is not None else None
        grad_g = torch.empty_like(g) if need_g else None
        grad_x = torch.empty_like(x) if need_x else None
        grad_W = torch.zeros(W.shape, dtype=_acc(x), device=W.device) if need_W else None
        for rows in _row_blocks(x.shape[0], W.shape[0]):
            xm = x[rows].to(mm)
            if right is not None:
                M = torch.cat((u_x[rows].to(mm), xm), -1) @ right.mT  # type: ignore[index]
            elif u_x is not None:
                M = u_x[rows].to(mm) @ Wm.mT
            else:
                M = xm @ u_W.to(mm).mT  # type: ignore[union-attr]
            want_dz = grad_x is not None or grad_W is not None
            gg, dz2, dz = second(M, xm @ Wm.mT, lse[rows], labels[rows], g[rows], mm, want_dz)
            if grad_g is not None:
                grad_g[rows] = gg.to(g.dtype)
            if not want_dz:
                continue
            if grad_x is not None:
                gx = dz2 @ Wm
                if u_W is not None:
                    gx = gx + dz @ u_W.to(mm)
                grad_x[rows] = gx.to(x.dtype)
            if grad_W is not None:
                grad_W += dz2.mT @ xm
                if u_x is not None:
                    grad_W += dz.mT @ u_x[rows].to(mm)
        grad_W = grad_W.to(W.dtype) if grad_W is not None else None
        return grad_x, grad_W, None, None, grad_g, None, None, None


def nll_and_dlogits(z: torch.Tensor, labels: torch.Tensor, acc: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """From logits ``z [n, V]``: the NLL ``[n]`` (in ``acc``) and ``∂nll/∂z = p − Y`` in
    ``z``'s dtype, the softmax statistics in ``acc``. One pass of elementwise work over the
    logits, which :func:`linear_nll_inner_step` may have compiled (fused into two reads of
    ``z`` and one write)."""
    zf = z.to(acc)  # once: _stats and _probs then take it as it is
    lse, nll = _stats(zf, labels, acc)
    # (zf is z itself when z is in acc already: a fresh product, which _probs may overwrite)
    return nll, _minus_onehot_(_probs(zf, lse), labels).to(z.dtype)


def _nll_step(x: torch.Tensor, acc: torch.dtype, compiled: bool) -> Any:
    """The inner step's work over one row block's logits: on a GPU with Triton, one kernel
    (:mod:`tttlm.ops.triton_head_nll`: two reads of the logits instead of three), else
    :func:`nll_and_dlogits` as it is or compiled."""
    fallback = _run(nll_and_dlogits, compiled)
    if not (x.is_cuda and acc == torch.float32 and triton_available()):
        return fallback
    from tttlm.ops import triton_head_nll

    def step(z: torch.Tensor, labels: torch.Tensor, acc: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if triton_head_nll.nll_dlogits_can_run(z, labels, acc):
            return triton_head_nll.nll_dlogits(z, labels)
        return fallback(z, labels, acc)

    return step


class _LinearNLLInnerStep(torch.autograd.Function):
    """The head for an inner step: the NLL, and from the same logits ``dx₀ = (p − Y) W`` per
    row; the one backward pass returns ``g · dx₀`` (``dx`` is linear in each row's upstream
    ``g``), so the logits are formed once instead of again in the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                mm: torch.dtype, compiled: bool) -> torch.Tensor:
        acc = _acc(x)
        # Under autocast, W goes to the products as it is: autocast casts it once per region
        # (its weight cache) instead of once per chunk, a pass over the [V, D] head each.
        Wm = W if _autocast_casts(W, mm) else W.to(mm)
        step = _nll_step(x, acc, compiled)
        nll = x.new_empty(x.shape[0], dtype=acc)
        dx0 = torch.empty_like(x)
        for rows in _row_blocks(x.shape[0], W.shape[0]):
            nll[rows], dz = step(F.linear(x[rows].to(mm), Wm), labels[rows], acc)
            dx0[rows] = (dz @ Wm).to(x.dtype)
        ctx.save_for_backward(dx0)
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        dx0, = ctx.saved_tensors
        return dx0 * g.to(dx0.dtype)[:, None], None, None, None, None


def linear_nll_inner_step(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          compiled: bool = False) -> torch.Tensor:
    """:func:`linear_nll` for an inner step without outer gradient: one backward pass at
    most, first order, and ``weight`` a constant (no gradient reaches it). The gradient with
    respect to ``x`` is formed in the forward from the same logits (no second ``[N, V]``
    product, no second softmax); ``compiled`` fuses the softmax work with ``torch.compile``."""
    shape = x.shape[:-1]
    nll = _LinearNLLInnerStep.apply(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1),
                                    _matmul_dtype(x), compiled)
    return nll.view(shape)


# Rows of the [N, V] logits materialised at once: about 1 GiB of fp32 at a 128K vocabulary, so
# a step of many sequences (prefill of 16 x 1K-token chunks) needs no [N, V] buffer.
MAX_BLOCK_ELEMENTS = 2**28


def _row_blocks(n: int, vocab: int) -> list[slice]:
    step = max(1, MAX_BLOCK_ELEMENTS // max(vocab, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def linear_nll(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               compiled: bool = False) -> torch.Tensor:
    """``token_nll(x @ weight.T, labels)`` for ``x [..., D]``, ``weight [V, D]`` → ``[...]``.
    ``compiled``: the elementwise work over the logits (softmax statistics, their first and
    second derivatives) runs fused by ``torch.compile``, a pass or two per row block instead
    of one per operation."""
    shape = x.shape[:-1]
    nll = _LinearNLL.apply(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1),
                           _matmul_dtype(x), compiled)
    return nll.view(shape)


def naive_linear_nll(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference: materialise the logits and let autograd keep what it needs."""
    return token_nll(x @ weight.mT, labels)
