"""TTT-KVB: the test-time-training layer TTT-E2E derives from (key-value binding; TTT-Linear of
"Learning to (Learn at Test Time)", Sun et al. 2024), with a naive reference beside it.

Per head, fast weights ``W [d, d]`` and ``b [d]`` define ``f(x) = x + LN(x W + b)`` (LN with
learned ``gamma``, ``beta``). The inner loss of token ``s`` binds its key to its value,
``l_s(W, b) = 1/2 |f(k_s) - v_s|^2``. Tokens are read in chunks of ``chunk``: within a chunk,
every gradient is taken at the chunk's starting weights (mini-batch gradient descent), token ``t``
reads with the weights after the steps of tokens ``s <= t`` of its chunk,
``W_t = W - sum_{s<=t} eta_s grad_W l_s(W)``, and outputs ``f(q_t; W_t, b_t)``; the chunk's last
weights start the next chunk. ``eta_s`` is a per-token, per-head learning rate.

:func:`ttt_kvb` is the dual form (Sun et al.): the LN backward in closed form and the in-chunk
sums as one masked ``[c, c]`` product, first-order differentiable, no gradient of a gradient.
:func:`ttt_kvb_naive` does what the definition says, token by token, with autograd's gradient of
each loss (a second-order graph for the outer gradient): the reference the tests hold it to.
"""

from __future__ import annotations

import torch


def _layer_norm(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LN over the last axis: output, normalised input and 1/std."""
    mu = y.mean(-1, keepdim=True)
    rstd = (y.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    x_hat = (y - mu) * rstd
    return gamma * x_hat + beta, x_hat, rstd


def _span(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, E: torch.Tensor,
          w_grad: torch.Tensor, b_grad: torch.Tensor, w_read: torch.Tensor,
          b_read: torch.Tensor, g: torch.Tensor, bt: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``[B, H, c, d]`` that all lie in one chunk: their gradients at the chunk's
    starting weights ``w_grad, b_grad``; each reads ``w_read, b_read`` (the weights after the
    chunk's earlier tokens) minus the steps of the span's tokens up to itself. Returns the
    outputs and the read weights after the span."""
    c = Q.shape[2]
    # The gradient of every token's loss w.r.t. y_s = k_s W + b, at the chunk's start.
    out, x_hat, rstd = _layer_norm(K @ w_grad + b_grad[..., None, :], g, bt, eps)
    grad_ln = g * (out + K - V)
    grad_y = rstd * (grad_ln - grad_ln.mean(-1, keepdim=True)
                     - x_hat * (grad_ln * x_hat).mean(-1, keepdim=True))
    # q_t W_t + b_t = q_t W + b - sum_{s<=t} eta_s (q_t . k_s + 1) grad_y_s
    causal = torch.ones(c, c, dtype=torch.bool, device=Q.device).tril()
    mix = ((Q @ K.transpose(-1, -2) + 1) * E[..., None, :]).masked_fill(~causal, 0)
    z = Q @ w_read + b_read[..., None, :] - mix @ grad_y
    step = E[..., None] * grad_y  # [B, H, c, d]
    return (Q + _layer_norm(z, g, bt, eps)[0], w_read - K.transpose(-1, -2) @ step,
            b_read - step.sum(-2))


def ttt_kvb(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
            chunk: int, eps: float = 1e-6, last_start: bool = False
            ) -> tuple[torch.Tensor, ...]:
    """TTT-KVB over ``q, k, v [B, H, T, d]`` with learning rates ``eta [B, H, T]``.

    ``weight [B, H, d, d]``, ``bias [B, H, d]``: the fast weights before the first token
    (broadcastable: ``[H, d, d]`` for learned initial weights); ``gamma, beta [H, d]``: the LN
    inside ``f``. Returns the outputs ``[B, H, T, d]`` and the fast weights after the last
    token (a partial last chunk's steps applied); with ``last_start`` also the weights at the
    start of the last chunk (what :func:`ttt_kvb_continue` takes its gradients at).
    """
    T = q.shape[2]
    g, bt = gamma[:, None, :], beta[:, None, :]  # [H, 1, d]: over the chunk's rows
    outs = []
    start = weight, bias
    for s in range(0, T, chunk):
        start = weight, bias
        out, weight, bias = _span(q[:, :, s:s + chunk], k[:, :, s:s + chunk],
                                  v[:, :, s:s + chunk], eta[:, :, s:s + chunk], weight, bias,
                                  weight, bias, g, bt, eps)
        outs.append(out)
    if last_start:
        return torch.cat(outs, dim=2), weight, bias, *start
    return torch.cat(outs, dim=2), weight, bias


def ttt_kvb_continue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                     w_start: torch.Tensor, b_start: torch.Tensor, w_now: torch.Tensor,
                     b_now: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Continue a sequence with tokens ``[B, H, n, d]`` that all lie in its current chunk:
    ``w_start, b_start`` are the weights at the chunk's start, ``w_now, b_now`` after its
    tokens so far (equal at a chunk's first token). Returns the outputs and the new
    ``w_now, b_now``; the same values as :func:`ttt_kvb` over the whole sequence."""
    return _span(q, k, v, eta, w_start, b_start, w_now, b_now, gamma[:, None, :],
                 beta[:, None, :], eps)


def ttt_kvb_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                  beta: torch.Tensor, chunk: int, eps: float = 1e-6
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ttt_kvb` by its definition: token by token, autograd's gradient of each
    token's inner loss at the chunk's starting weights (slow; for tests)."""
    B, H, T, d = q.shape
    weight = weight.expand(B, H, d, d)
    bias = bias.expand(B, H, d)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = (x.unsqueeze(-2) @ w).squeeze(-2) + b  # [B, H, d]
        return x + _layer_norm(y, gamma, beta, eps)[0]

    outs = []
    with torch.enable_grad():
        for s in range(0, T, chunk):
            start_w, start_b = weight, bias
            if not start_w.requires_grad:  # a leaf to differentiate the inner losses by
                start_w, start_b = start_w.clone().requires_grad_(), start_b.clone()
                start_b.requires_grad_()
            w, b = start_w, start_b
            for t in range(s, min(s + chunk, T)):
                loss = 0.5 * (f(k[:, :, t], start_w, start_b) - v[:, :, t]).square().sum()
                gw, gb = torch.autograd.grad(loss, (start_w, start_b), create_graph=True)
                w = w - eta[:, :, t, None, None] * gw
                b = b - eta[:, :, t, None] * gb
                outs.append(f(q[:, :, t], w, b))
            weight, bias = w, b
    return torch.stack(outs, dim=2), weight, bias


# ------------------------------------------------------------------- MLP fast weights
# TTT-MLP's form: f(x) = x + LN(gelu(x W1 + b1) W2 + b2), W1 [d, m], W2 [m, d]. Every gradient
# of a chunk is taken at the chunk's starting weights, so both layers keep the dual form: a
# token reads z_t = q_t W1 - sum_s eta_s (q_t . k_s + 1) dz_s and then
# y_t = gelu(z_t) W2 - sum_s eta_s (gelu(z_t) . a_s + 1) dy_s, with a_s, dz_s, dy_s the
# chunk-start activations and gradients of token s.
MLPWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # W1, b1, W2, b2


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d gelu(z) / dz for the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    return cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327


def _mlp_span(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, E: torch.Tensor,
              grad_at: MLPWeights, read: MLPWeights, g: torch.Tensor, bt: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, MLPWeights]:
    """:func:`_span` for MLP fast weights."""
    w1, b1, w2, b2 = grad_at
    c = Q.shape[2]
    z = K @ w1 + b1[..., None, :]
    a = torch.nn.functional.gelu(z)
    out, x_hat, rstd = _layer_norm(a @ w2 + b2[..., None, :], g, bt, eps)
    grad_ln = g * (out + K - V)
    grad_y = rstd * (grad_ln - grad_ln.mean(-1, keepdim=True)
                     - x_hat * (grad_ln * x_hat).mean(-1, keepdim=True))
    grad_z = (grad_y @ w2.transpose(-1, -2)) * _gelu_grad(z)
    causal = torch.ones(c, c, dtype=torch.bool, device=Q.device).tril()
    r1, c1, r2, c2 = read
    # first layer: its input is the query itself
    mix1 = ((Q @ K.transpose(-1, -2) + 1) * E[..., None, :]).masked_fill(~causal, 0)
    a_read = torch.nn.functional.gelu(Q @ r1 + c1[..., None, :] - mix1 @ grad_z)
    mix2 = ((a_read @ a.transpose(-1, -2) + 1) * E[..., None, :]).masked_fill(~causal, 0)
    y = a_read @ r2 + c2[..., None, :] - mix2 @ grad_y
    step1, step2 = E[..., None] * grad_z, E[..., None] * grad_y
    new = (r1 - K.transpose(-1, -2) @ step1, c1 - step1.sum(-2),
           r2 - a.transpose(-1, -2) @ step2, c2 - step2.sum(-2))
    return Q + _layer_norm(y, g, bt, eps)[0], new


def ttt_kvb_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                weights: MLPWeights, gamma: torch.Tensor, beta: torch.Tensor, chunk: int,
                eps: float = 1e-6) -> tuple[torch.Tensor, MLPWeights, MLPWeights]:
    """:func:`ttt_kvb` with MLP fast weights ``(W1 [.., d, m], b1 [.., m], W2 [.., m, d],
    b2 [.., d])``: returns the outputs, the weights after the last token and the weights at
    the start of the last chunk."""
    g, bt = gamma[:, None, :], beta[:, None, :]
    outs, start = [], weights
    for s in range(0, q.shape[2], chunk):
        start = weights
        part = slice(s, s + chunk)
        out, weights = _mlp_span(q[:, :, part], k[:, :, part], v[:, :, part],
                                 eta[:, :, part], weights, weights, g, bt, eps)
        outs.append(out)
    return torch.cat(outs, dim=2), weights, start


def ttt_kvb_mlp_continue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                         start: MLPWeights, now: MLPWeights, gamma: torch.Tensor,
                         beta: torch.Tensor, eps: float = 1e-6
                         ) -> tuple[torch.Tensor, MLPWeights]:
    """:func:`ttt_kvb_continue` with MLP fast weights."""
    return _mlp_span(q, k, v, eta, start, now, gamma[:, None, :], beta[:, None, :], eps)


def ttt_kvb_mlp_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
                      weights: MLPWeights, gamma: torch.Tensor, beta: torch.Tensor,
                      chunk: int, eps: float = 1e-6) -> tuple[torch.Tensor, MLPWeights]:
    """:func:`ttt_kvb_mlp` by its definition, token by token (for tests; ``weights``
    unbatched, ``[H, ...]``)."""
    B, T = q.shape[0], q.shape[2]
    weights = tuple(w.expand(B, *w.shape) for w in weights)  # type: ignore[assignment]

    def f(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
        w1, b1, w2, b2 = w
        a = torch.nn.functional.gelu((x.unsqueeze(-2) @ w1).squeeze(-2) + b1)
        y = (a.unsqueeze(-2) @ w2).squeeze(-2) + b2
        return x + _layer_norm(y, gamma, beta, eps)[0]

    outs = []
    with torch.enable_grad():
        for s in range(0, T, chunk):
            start = tuple(w if w.requires_grad else w.clone().requires_grad_() for w in weights)
            now = start
            for t in range(s, min(s + chunk, T)):
                loss = 0.5 * (f(k[:, :, t], start) - v[:, :, t]).square().sum()  # type: ignore[arg-type]
                grads = torch.autograd.grad(loss, start, create_graph=True)
                e = eta[:, :, t]
                now = tuple(w - (e[..., None, None] if w.dim() == 4 else e[..., None]) * gw
                            for w, gw in zip(now, grads))
                outs.append(f(q[:, :, t], now))  # type: ignore[arg-type]
            weights = now  # type: ignore[assignment]
    return torch.stack(outs, dim=2), weights  # type: ignore[return-value]
