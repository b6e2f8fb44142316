"""Transformer blocks of TTT-E2E: sandwich-normed attention, prime MLP and SwiGLU MLP.

The official layout is the default; :class:`~tttlm.config.TTTConfig` also describes the
Llama family (grouped-query attention, no QK-norm, pre-norms only, biases) so that pretrained
models import exactly."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tttlm.config import TTTConfig
from tttlm.model.cache import LayerCache, RopeTables, Rows
from tttlm.ops.compiled import inductor_compile
from tttlm.ops.gated_delta import gated_delta_rule, ssd_rule
from tttlm.ops.norm import rms_norm
from tttlm.ops.rope import apply_rope
from tttlm.ops.ttt_kvb import ttt_kvb, ttt_kvb_continue, ttt_kvb_mlp, ttt_kvb_mlp_continue

# The prime MLP's three matrices of one block, in nn.Linear layout: w1 [F, D], w2 [D, F],
# w3 [F, D], optionally with a leading batch axis (one copy per sequence).
FastWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def products_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's dtype where it feeds several products and takes no gradient: the
    value each product's own cast would give, made once. Compiled, that is one buffer instead
    of one per product (3b's prefix blocks wrote their normed input three times, for q, k and
    v, at 128K rows of 2560). With a gradient each product keeps its own cast, whose backward
    returns that product's share to x's dtype before the shares are summed."""
    kind = x.device.type
    if x.dtype == torch.float32 and not x.requires_grad and torch.is_autocast_enabled(kind):
        return x.to(torch.get_autocast_dtype(kind))
    return x


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """``(silu(x W1ᵀ) * (x W3ᵀ)) W2ᵀ``; weights may carry a leading batch axis matching x."""
    if w1.dim() == 2:
        x = products_input(x)
        # F.linear (the product x @ w.mT): autocast casts the weight itself, once per autocast
        # region (its weight cache), where a transposed view of it would be cast every call.
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    # Per-sequence (fast) weights: each product as (W xᵀ)ᵀ, whose gradient W̄ = ȳᵀ x comes
    # out of the batched matmul in W's own row-major layout. Written as x Wᵀ, autograd gives
    # W̄ = (xᵀ ȳ)ᵀ, a transposed view: the inner step's norms then copy it and its update
    # reads it with strides across rows, a pass over every fast weight each.
    h = F.silu(_times_t(x, w1)) * _times_t(x, w3)
    return _times_t(h, w2).contiguous()


def _times_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` for ``x [B, n, i]``, ``w [B, o, i]``, computed as ``(W xᵀ)ᵀ``."""
    return (w @ x.mT).mT


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``; ``bias`` only for imported MLPs (prime MLPs have none)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)

    def weights(self) -> FastWeights:
        return self.w1.weight, self.w2.weight, self.w3.weight

    def forward(self, x: torch.Tensor, weights: FastWeights | None = None) -> torch.Tensor:
        if weights is None and self.w1.bias is not None:
            x = products_input(x)
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return swiglu(x, *(weights if weights is not None else self.weights()))


class Attention(nn.Module):
    """Multi-head attention, by default with QK-norm (shared over heads, before RoPE) and no
    bias (official); grouped-query with ``num_kv_heads < num_heads``."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        D, d = config.hidden_size, config.head_dim
        assert d is not None and config.num_kv_heads is not None
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.wq = nn.Linear(D, config.num_heads * d, bias=config.qkv_bias)
        self.wk = nn.Linear(D, config.num_kv_heads * d, bias=config.qkv_bias)
        self.wv = nn.Linear(D, config.num_kv_heads * d, bias=config.qkv_bias)
        self.wo = nn.Linear(config.num_heads * d, D, bias=config.attn_out_bias)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, T, H, d]``, k (QK-normed when configured, before RoPE) and v
        ``[B, T, H_kv, d]``."""
        x = products_input(x)
        # head-major, as the official "(head head_dim)" and transformers' view(..., -1, d)
        q = self.wq(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.wk(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.wv(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        return self.wo(out.flatten(-2))


class KVBMixer(nn.Module):
    """TTT-KVB's own parameters (:mod:`tttlm.ops.ttt_kvb`): per head the initial fast weights,
    ``linear`` (``weight [H, d, d]``, ``bias [H, d]``) or ``mlp`` (``weight1 [H, d, 4d]``,
    ``bias1``, ``weight2 [H, 4d, d]``, ``bias2``; matrices N(0, initializer_range), biases 0),
    the LN inside ``f`` (``ln_weight`` 1, ``ln_bias`` 0), and ``lr``, a linear map from the
    block's normed input to one inner learning-rate logit per head: ``eta = inner_lr *
    sigmoid(lr(x)) / d``. Queries, keys and values come from the block's attention projections
    (QK-normed, no RoPE); the output goes through its output projection."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        H, d = config.num_heads, config.head_dim
        assert d is not None
        self.head_dim, self.inner_lr, self.chunk = d, config.inner_lr, config.chunk_size
        self.eps, self.std = config.rms_norm_eps, config.initializer_range
        self.mlp = config.kvb_fast == "mlp"
        m = 4 * d
        shapes = ({"weight1": (H, d, m), "bias1": (H, m), "weight2": (H, m, d), "bias2": (H, d)}
                  if self.mlp else {"weight": (H, d, d), "bias": (H, d)})
        self.fast_names = tuple(shapes)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.ln_weight = nn.Parameter(torch.empty(H, d))
        self.ln_bias = nn.Parameter(torch.empty(H, d))
        self.lr = nn.Linear(config.hidden_size, H)
        self.reset_parameters()

    def fast_params(self) -> tuple[torch.Tensor, ...]:
        """The initial fast weights, in the order the ops and ``State.mixers`` keep them."""
        return tuple(getattr(self, name) for name in self.fast_names)

    def state_shapes(self) -> list[tuple[int, ...]]:
        """Shapes (without the batch axis) of the decoding state: the fast weights at the
        current chunk's start, then after the tokens read so far."""
        return [tuple(w.shape) for w in self.fast_params() * 2]

    def initial_state(self, batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [w.detach().to(dtype).unsqueeze(0).repeat(batch, *([1] * w.dim()))
                for w in self.fast_params() * 2]

    def reset_parameters(self) -> None:
        for p in self.fast_params():
            if p.dim() == 3:
                nn.init.normal_(p, 0.0, self.std)
            else:
                nn.init.zeros_(p)
        nn.init.ones_(self.ln_weight)
        nn.init.zeros_(self.ln_bias)
        nn.init.normal_(self.lr.weight, 0.0, self.std)
        nn.init.zeros_(self.lr.bias)

    def inputs(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
        """Head-major ``q, k, v [B, H, n, d]`` and ``eta [B, H, n]`` in the fast weights'
        precision (fp32 under bf16 autocast) from ``x [B, n, D]`` (the block's normed input)
        and the attention projections ``q [B, n, H, d]``, ``k, v [B, n, H_kv, d]``."""
        H, inner = q.shape[2], self.inner_dtype
        if k.shape[2] != H:  # grouped-query projections: each query head gets its group's
            k = k.repeat_interleave(H // k.shape[2], dim=2)
            v = v.repeat_interleave(H // v.shape[2], dim=2)
        eta = self.inner_lr * torch.sigmoid(self.lr(x).to(inner)) / self.head_dim  # [B, n, H]
        return (*(t.transpose(1, 2).to(inner) for t in (q, k, v)), eta.transpose(1, 2))

    @property
    def inner_dtype(self) -> torch.dtype:
        """float32 (float64 for a float64 model): the inner loop and its state never run in
        bf16, as the e2e fast weights (a bf16 model keeps its decoding state in float32)."""
        return torch.float64 if self.ln_weight.dtype == torch.float64 else torch.float32

    def _inner(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """The initial fast weights and the LN parameters in :attr:`inner_dtype`."""
        inner = self.inner_dtype
        return (tuple(p.to(inner) for p in self.fast_params()), self.ln_weight.to(inner),
                self.ln_bias.to(inner))

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                state: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Whole sequences from the initial fast weights (arguments as :meth:`inputs`);
        returns ``[B, T, H, d]``. ``state``: the decoding tensors to fill (``State.mixers``:
        the fast weights at the last chunk's start, then after the last token)."""
        qh, kh, vh, eta = self.inputs(x, q, k, v)
        # The inner loop (LN statistics, gradients, updates) in full precision, outside
        # autocast, as the e2e inner step keeps its fast weights fp32.
        fast, ln_w, ln_b = self._inner()
        with torch.autocast(q.device.type, enabled=False):
            if self.mlp:
                out, now, start = ttt_kvb_mlp(qh, kh, vh, eta, fast,  # type: ignore[arg-type]
                                              ln_w, ln_b, self.chunk, self.eps)
            else:
                out, w, b, w0, b0 = ttt_kvb(qh, kh, vh, eta, *fast, ln_w, ln_b, self.chunk,
                                            self.eps, last_start=True)
                now, start = (w, b), (w0, b0)
        if state is not None:
            for buf, value in zip(state, (*start, *now), strict=True):
                buf.copy_(value.detach().expand_as(buf))
        return out.transpose(1, 2).to(q.dtype)

    def step(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             state: Sequence[torch.Tensor], begins: torch.Tensor, rows: Rows) -> torch.Tensor:
        """New tokens ``[B, n]`` of decoding sequences, each row's within its current chunk
        (``begins [B]``: the row's first new token starts a chunk); reads and updates
        ``state`` in place for the written ``rows``; returns ``[B, n, H, d]``."""
        qh, kh, vh, eta = self.inputs(x, q, k, v)
        n = len(self.fast_names)
        _, ln_w, ln_b = self._inner()
        now = tuple(t.to(qh.dtype) for t in state[n:])
        # a row whose chunk starts here takes its gradients at the weights it has now
        start = tuple(torch.where(begins.view(-1, *([1] * (w.dim() - 1))), w, s.to(w.dtype))
                      for s, w in zip(state[:n], now))
        with torch.autocast(q.device.type, enabled=False):
            if self.mlp:
                out, new = ttt_kvb_mlp_continue(qh, kh, vh, eta, start, now,  # type: ignore[arg-type]
                                                ln_w, ln_b, self.eps)
            else:
                out, *new = ttt_kvb_continue(qh, kh, vh, eta, *start, *now, ln_w, ln_b,
                                             self.eps)
        index = rows.column[:, 0]
        for buf, value in zip(state, (*start, *new), strict=True):
            buf[index] = rows.keep(value).to(buf.dtype)
        return out.transpose(1, 2).to(q.dtype)


class ConvRecurrentMixer(nn.Module):
    """What Gated DeltaNet and Mamba 2 share around their recurrence: causal depthwise
    convolutions of width 4 on the block's q, k, v projections (then SiLU), and a per-head
    RMSNorm of the output gated by ``silu(gate(x))``; the block's output projection follows.
    Subclasses define the recurrence (:meth:`_rule`) and its parameters. Decoding state
    (``State.mixers``): the last 3 inputs of each convolution, then the recurrence's state
    ``[H, d, d]``."""

    CONV = 4

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        H, d, D = config.num_heads, config.head_dim, config.hidden_size
        assert d is not None
        self.heads, self.head_dim, self.std = H, d, config.initializer_range
        self.eps = config.rms_norm_eps
        C = H * d
        self.conv_q = nn.Parameter(torch.empty(C, self.CONV))
        self.conv_k = nn.Parameter(torch.empty(C, self.CONV))
        self.conv_v = nn.Parameter(torch.empty(C, self.CONV))
        self.gate = nn.Linear(D, C, bias=False)
        self.o_norm = nn.Parameter(torch.empty(d))

    def reset_parameters(self) -> None:
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            nn.init.uniform_(conv, -self.CONV ** -0.5, self.CONV ** -0.5)  # Conv1d's default
        nn.init.normal_(self.gate.weight, 0.0, self.std)
        nn.init.ones_(self.o_norm)

    def _reset_decay(self, A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
        """Mamba's initialisation: A in [1, 16], dt in [1e-3, 0.1] log-uniform."""
        with torch.no_grad():
            A_log.copy_(torch.empty_like(A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.empty_like(dt_bias).uniform_(math.log(1e-3), math.log(0.1)))
            dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def state_shapes(self) -> list[tuple[int, ...]]:
        C, w = self.heads * self.head_dim, self.CONV - 1
        return [(C, w), (C, w), (C, w), (self.heads, self.head_dim, self.head_dim)]

    def initial_state(self, batch: int, dtype: torch.dtype) -> list[torch.Tensor]:
        p = self.o_norm
        return [torch.zeros(batch, *s, device=p.device, dtype=dtype)
                for s in self.state_shapes()]

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, past: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise convolution of ``x [B, n, C]`` after ``past [B, C, CONV-1]`` (the
        previous inputs; zeros at a sequence's start): SiLU of it, and the new past."""
        xt = x.transpose(1, 2)  # [B, C, n]
        if past is None:
            past = xt.new_zeros(*xt.shape[:2], self.CONV - 1)
        full = torch.cat((past.to(xt.dtype), xt), dim=2)
        out = F.conv1d(full, weight.to(xt.dtype)[:, None, :], groups=weight.shape[0])
        return F.silu(out).transpose(1, 2), full[:, :, -(self.CONV - 1):]

    def _rule(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              state: torch.Tensor | None, decoding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrence over ``q, k, v [B, n, H, d]`` (after the convolutions) from
        ``state``: outputs and the state after the last token."""
        raise NotImplementedError

    def _mix(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             past: Sequence[torch.Tensor | None], state: torch.Tensor | None, decoding: bool
             ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        H, d = self.heads, self.head_dim
        B, n = q.shape[:2]
        if k.shape[2] != H:  # grouped-query projections: each query head gets its group's
            k = k.repeat_interleave(H // k.shape[2], dim=2)
            v = v.repeat_interleave(H // v.shape[2], dim=2)
        mixed, new_past = [], []
        for t, w, p in zip((q, k, v), (self.conv_q, self.conv_k, self.conv_v), past):
            out, kept = self._conv(t.flatten(2), w, p)
            mixed.append(out.view(B, n, H, d))
            new_past.append(kept)
        out, final = self._rule(x, *mixed, state, decoding)
        gate = F.silu(self.gate(x)).view(B, n, H, d)
        return rms_norm(out.to(q.dtype), self.o_norm, self.eps) * gate, new_past, final

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                state: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Whole sequences from an empty state: ``x [B, T, D]`` (the normed input) and the
        attention projections; returns ``[B, T, H, d]``. ``state``: the decoding tensors to
        fill (``State.mixers``)."""
        out, past, final = self._mix(x, q, k, v, (None, None, None), None, False)
        if state is not None:
            for buf, value in zip(state, (*past, final), strict=True):
                buf.copy_(value.detach())
        return out

    def step(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             state: Sequence[torch.Tensor], begins: torch.Tensor, rows: Rows) -> torch.Tensor:
        """New tokens ``[B, n]`` of decoding sequences; reads and updates ``state`` in place
        for the written ``rows`` (``begins``: unused, these rules have no chunks)."""
        out, past, final = self._mix(x, q, k, v, state[:3], state[3], True)
        index = rows.column[:, 0]
        for buf, value in zip(state, (*past, final), strict=True):
            buf[index] = rows.keep(value).to(buf.dtype)
        return out


class GatedDeltaNetMixer(ConvRecurrentMixer):
    """Gated DeltaNet (Yang, Kautz and Hatamizadeh, 2024): q, k L2-normalised per head, the
    log-decay ``g = -exp(A_log) * softplus(a(x) + dt_bias)`` and write strength ``beta =
    sigmoid(b(x))`` per head and token, the gated delta rule (:mod:`tttlm.ops.gated_delta`,
    flash-linear-attention)."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        H, D = config.num_heads, config.hidden_size
        self.a = nn.Linear(D, H, bias=False)
        self.b = nn.Linear(D, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for lin in (self.a, self.b):
            nn.init.normal_(lin.weight, 0.0, self.std)
        self._reset_decay(self.A_log, self.dt_bias)

    def _rule(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              state: torch.Tensor | None, decoding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        g = -self.A_log.exp() * F.softplus(self.a(x) + self.dt_bias)  # [B, n, H]
        beta = torch.sigmoid(self.b(x))
        with torch.autocast(q.device.type, enabled=False):
            return gated_delta_rule(q, k, v, g, beta, state, decoding)


class Mamba2Mixer(ConvRecurrentMixer):
    """Mamba 2's state-space duality layer (Dao and Gu, 2024) in the block's projections: the
    convolved q, k, v are its C, B and x (state size = head width, one group per head); per head
    and token the step ``dt = softplus(dt_proj(x) + dt_bias)``, the decay ``exp(-exp(A_log) dt)``,
    ``S = decay S + dt B x^T``, ``y = C^T S + D x``: a scalar-gated linear recurrence, run by
    flash-linear-attention's simple-GLA kernels (:func:`tttlm.ops.gated_delta.ssd_rule`)."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        H, D = config.num_heads, config.hidden_size
        self.dt_proj = nn.Linear(D, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.dt_proj.weight, 0.0, self.std)
        self._reset_decay(self.A_log, self.dt_bias)
        nn.init.ones_(self.D)

    def _rule(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              state: torch.Tensor | None, decoding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dt = F.softplus(self.dt_proj(x) + self.dt_bias)  # [B, n, H]
        g = -self.A_log.exp() * dt
        with torch.autocast(q.device.type, enabled=False):
            out, final = ssd_rule(q, k, v * dt[..., None], g, state, decoding)
        return out + self.D[:, None] * v, final


class Block(nn.Module):
    """``h += post(attn(pre(h)))``; TTT blocks then ``h += post'(prime(pre'(h)))``; then the MLP."""

    def __init__(self, config: TTTConfig, has_prime: bool, mixer: str = "attention") -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps

        def post_norm() -> nn.Module:
            # Without sandwich norms (Llama) a branch's output joins the residual as it is.
            return RMSNorm(D, eps) if config.post_norms else nn.Identity()

        self.attn_norm = RMSNorm(D, eps)
        self.attn = Attention(config)
        self.attn_post_norm = post_norm()
        # A recurrent layer mixes the tokens instead of attention (the ``ttt_kvb``,
        # ``gated_deltanet`` and ``mamba2`` variants' mixed-in blocks); it uses the attention
        # projections.
        self.kvb = KVBMixer(config) if mixer == "ttt_kvb" else None
        self.gdn = GatedDeltaNetMixer(config) if mixer == "gated_deltanet" else None
        self.ssd = Mamba2Mixer(config) if mixer == "mamba2" else None
        self.has_prime = has_prime
        if has_prime:
            assert config.prime_intermediate_size is not None
            self.prime_norm = RMSNorm(D, eps)
            self.prime = SwiGLU(D, config.prime_intermediate_size)
            self.prime_post_norm = post_norm()
        self.mlp_norm = RMSNorm(D, eps)
        self.mlp = SwiGLU(D, config.intermediate_size, bias=config.mlp_bias)
        self.mlp_post_norm = post_norm()

    @property
    def recurrent(self) -> KVBMixer | ConvRecurrentMixer | None:
        """The block's recurrent token mixer, or ``None`` for attention."""
        for mixer in (self.kvb, self.gdn, self.ssd):
            if mixer is not None:
                return mixer
        return None

    def feed_forward(self, h: torch.Tensor, fast: FastWeights | None = None) -> torch.Tensor:
        """Everything after attention: the prime MLP (with ``fast`` weights if given), the MLP."""
        if self.has_prime:
            h = h + self.prime_post_norm(self.prime(self.prime_norm(h), fast))
        return h + self.mlp_post_norm(self.mlp(self.mlp_norm(h)))

    def attention_inputs(self, h: torch.Tensor, rope: RopeTables | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (QK-normed; rotated when ``rope`` tables are given) and v, ``[B, n, H, d]``."""
        q, k, v = self.attn.project(self.attn_norm(h))
        if rope is None:
            return q, k, v
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def attention_output(self, h: torch.Tensor, out: torch.Tensor,
                         fast: FastWeights | None = None) -> torch.Tensor:
        """The residual update from the attention output ``out [B, n, H, d]``, then the rest."""
        h = h + self.attn_post_norm(self.attn.merge(out))
        return self.feed_forward(h, fast)

    def forward(self, h: torch.Tensor, cache: LayerCache, fast: FastWeights | None = None,
                compiled: bool = False) -> torch.Tensor:
        """The block over new rows ``h [B, n, D]``: training (whole sequences, TTT chunks),
        evaluation, prefill and decoding alike; ``cache`` decides which keys the rows attend
        to and keeps what later rows need (:mod:`tttlm.model.cache`). ``fast``: the prime
        MLP's weights, one copy per sequence. ``compiled`` runs the code around attention
        through ``torch.compile`` (fused norms, RoPE and casts; first-order differentiable
        only, one backward pass per graph).
        """
        recurrent = self.recurrent
        if recurrent is not None:  # the cache says over which state it mixes
            x = self.attn_norm(h)
            q, k, v = self.attn.project(x)
            return self.attention_output(h, cache.mix(recurrent, x, q, k, v), fast)
        inputs, output = _parts(compiled, cache.rope is not None)
        q, k, v = inputs(self, h, cache.rope)
        return output(self, h, cache.attend(q, k, v), fast)


def _parts(compiled: bool, rotated: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """What runs before and after attention, eager or compiled."""
    if not compiled:
        return Block.attention_inputs, Block.attention_output
    return _COMPILED[rotated]()


# torch.compile keeps its compiled graphs per code object, with a limit on their number: each
# use gets its own small function so that whole sequences and chunks (whose cache grows, and
# whose input may or may not require grad) do not share one budget.
def _rotated_inputs(block: Block, *args: Any) -> Any:
    return block.attention_inputs(*args)


def _rotated_output(block: Block, *args: Any) -> Any:
    return block.attention_output(*args)


def _plain_inputs(block: Block, *args: Any) -> Any:
    return block.attention_inputs(*args)


def _plain_output(block: Block, *args: Any) -> Any:
    return block.attention_output(*args)


@functools.cache
def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled once, shared by every block: torch.compile treats the module as an input
    (its parameters are graph inputs), so 32 layers compile once per structure (with or without
    a prime MLP), not once per layer. Attention stays outside: SDPA, flex_attention and the
    Triton kernel are fused already. Inductor's options: :func:`inductor_compile`."""
    return inductor_compile(fn)


# Whole sequences (RoPE inside the projection) and caches that rotate keys themselves.
_COMPILED = {
    True: lambda: (_compile(_rotated_inputs), _compile(_rotated_output)),
    False: lambda: (_compile(_plain_inputs), _compile(_plain_output)),
}
