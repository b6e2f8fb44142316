"""The inner optimizers: the official clipped SGD bit for bit, momentum, a learned per-layer
inner learning rate; their outer gradients (gradcheck through the inner steps), their state and
the registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tttlm.ttt.base import InnerOptimizer, InnerState, cat_states, index_state
from tttlm.ttt.fast import (
    FastWeights,
    PrimeWeights,
    detach_fast,
    expand_fast,
    fast_to,
    flatten_fast,
    index_fast,
    map_fast,
    unflatten_fast,
)
from tttlm.ttt.inner import inner_gradient, inner_step
from tttlm.ttt.learned_lr import LearnedLRSGD
from tttlm.ttt.modes import GradMode
from tttlm.ttt.momentum import MomentumSGD
from tttlm.ttt.optim import INNER_OPTIMIZERS, build_inner_optimizer
from tttlm.ttt.sgd import ClippedSGD

MODES = list(GradMode)
DTYPES = [torch.float32, torch.float64]
LR = 0.3
CLIP_ON, CLIP_OFF = 1e-3, 1e3  # far below / above the gradient norms of _problem (checked)


# ------------------------------------------------------------------- the official step, frozen
def _reference_inner_step(loss: torch.Tensor, fast: Sequence[torch.Tensor], lr: float,
                          clip: float, mode: GradMode) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``inner_step`` as it was before the inner optimizers (verbatim), to pin bit-exactness."""
    exact = mode is GradMode.EXACT
    grads = torch.autograd.grad(loss.sum(), list(fast), create_graph=exact,
                                retain_graph=mode is not GradMode.NONE)
    per_tensor = [torch.linalg.vector_norm(g.flatten(1), dim=-1,
                                           dtype=torch.float64 if g.dtype == torch.float64
                                           else torch.float32) for g in grads]
    norm = torch.linalg.vector_norm(torch.stack(per_tensor), dim=0)
    scale = torch.ones_like(norm) if clip <= 0 else clip / norm.clamp_min(clip)
    if not exact:
        grads = tuple(g.detach() for g in grads)
        scale = scale.detach()
    coef = -(lr * scale)
    new = [torch.addcmul(w, g, coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
           for w, g in zip(fast, grads)]
    if mode is GradMode.NONE:
        new = [w.detach() for w in new]
    with torch.no_grad():
        update_norm = (scale * norm).float() * lr
    return new, update_norm


class _Reference(InnerOptimizer):
    name = "reference"

    def step(self, loss, fast, state, lr, clip, mode):  # type: ignore[no-untyped-def]
        new, norm = _reference_inner_step(loss, flatten_fast(fast), lr, clip, mode)
        return unflatten_fast(new), {}, norm


# ---------------------------------------------------------------------------- a tiny problem
B, L, D, FF, T = 3, 2, 4, 5, 6


def _problem(dtype: torch.dtype, seed: int = 0, batch: int = B, dim: int = D, hidden: int = FF
             ) -> tuple[FastWeights, list[torch.Tensor]]:
    """W₀ of L layers (unbatched leaves) and per-sequence data: inputs/targets of 3 inner chunks
    and of the outer loss, each ``[batch, T, D]``."""
    gen = torch.Generator().manual_seed(seed)
    w0 = [PrimeWeights(*(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
                         for shape in ((hidden, dim), (dim, hidden), (hidden, dim))))
          for _ in range(L)]
    w0 = map_fast(lambda w: w.to(dtype).requires_grad_(True), w0)
    data = [torch.randn(batch, T, dim, generator=gen, dtype=torch.float64).to(dtype)
            for _ in range(8)]
    return w0, data


def _net(x: torch.Tensor, fast: FastWeights) -> torch.Tensor:
    """A residual stack of SwiGLU MLPs, one per layer (the prime MLPs alone)."""
    for p in fast:
        x = x + (F.silu(x @ p.w1.mT) * (x @ p.w3.mT)) @ p.w2.mT
    return x


def _loss(fast: FastWeights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sequence MSE ``[B]``: second derivatives w.r.t. the weights are non-trivial."""
    return (_net(x, fast) - y).square().mean(dim=(1, 2))


def _run(opt: InnerOptimizer, w0: FastWeights, data: list[torch.Tensor], mode: GradMode,
         clip: float, steps: int = 2, lr: float = LR, rows: list[int] | None = None,
         ) -> tuple[list[FastWeights], list[InnerState], list[torch.Tensor], torch.Tensor]:
    """``steps`` inner steps from W₀ (as the model does), then the outer loss ``[B]``."""
    batch = data[0].shape[0]
    fast = expand_fast(w0, batch)
    state = opt.init_state(fast)
    history, states, norms = [], [], []
    for i in range(steps):
        if mode is GradMode.NONE:
            fast = map_fast(lambda w: w.detach().requires_grad_(True), fast)
        loss = _loss(fast, data[2 * i], data[2 * i + 1])
        fast, state, norm = opt.step(loss, fast, state, lr, clip, mode)
        history.append(fast)
        states.append(state)
        norms.append(norm)
    return history, states, norms, _loss(fast, data[6], data[7])


def _outer_grads(opt: InnerOptimizer, w0: FastWeights, outer: torch.Tensor
                 ) -> list[torch.Tensor]:
    inputs = flatten_fast(w0) + list(opt.parameters())
    return list(torch.autograd.grad(outer.sum(), inputs, allow_unused=True))


def _assert_same(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_the_problem_clips_when_asked() -> None:
    w0, data = _problem(torch.float64)
    fast = map_fast(lambda w: w.detach().requires_grad_(True), expand_fast(w0, B))
    norm = inner_gradient(_loss(fast, data[0], data[1]), flatten_fast(fast), 0.0,
                          GradMode.NONE).norm
    assert bool((norm > 10 * CLIP_ON).all()) and bool((norm < CLIP_OFF / 10).all())


# ------------------------------------------------------- the official step, two new ones ≡ it
@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [CLIP_ON, CLIP_OFF, 0.0])
@pytest.mark.parametrize("make", [ClippedSGD, lambda n: MomentumSGD(n, beta=0.0),
                                  LearnedLRSGD], ids=["sgd", "momentum0", "learned_lr_init"])
def test_bit_identical_to_the_official_step(make: Callable[[int], InnerOptimizer],
                                            dtype: torch.dtype, mode: GradMode,
                                            clip: float) -> None:
    w0, data = _problem(dtype)
    ref = _run(_Reference(L), w0, data, mode, clip)
    opt = make(L).to(dtype) if dtype != torch.bfloat16 else make(L)
    got = _run(opt, w0, data, mode, clip)
    for new_ref, new_got in zip(ref[0], got[0]):
        _assert_same(flatten_fast(new_ref), flatten_fast(new_got))
        assert all(isinstance(p, PrimeWeights) for p in new_got)
    _assert_same(ref[2], got[2])  # update norms
    _assert_same([ref[3]], [got[3]])  # outer loss
    if mode is not GradMode.NONE:
        g_ref = _outer_grads(_Reference(L), w0, ref[3])
        g_got = _outer_grads(opt, w0, got[3])
        _assert_same(g_ref, g_got[:len(g_ref)])


@pytest.mark.parametrize("mode", MODES)
def test_inner_step_stays_the_official_step(mode: GradMode) -> None:
    # the function the model and the engine call, on the flat list
    w0, data = _problem(torch.float32)
    results = []
    for step in (_reference_inner_step, inner_step):
        fast = flatten_fast(expand_fast(w0, B))
        if mode is GradMode.NONE:
            fast = [w.detach().requires_grad_(True) for w in fast]
        loss = _loss(unflatten_fast(fast), data[0], data[1])
        new, norm = step(loss, fast, LR, CLIP_ON, mode)
        outer = _loss(unflatten_fast(new), data[6], data[7])
        grads = (list(torch.autograd.grad(outer.sum(), flatten_fast(w0)))
                 if mode is not GradMode.NONE else [])
        results.append([*new, norm, outer, *grads])
    _assert_same(*results)


# -------------------------------------------------------------------------------- momentum
@pytest.mark.parametrize("clip", [CLIP_ON, CLIP_OFF])
def test_momentum_equals_a_hand_written_loop(clip: float) -> None:
    beta = 0.8
    w0, data = _problem(torch.float64)
    history, states, norms, _ = _run(MomentumSGD(L, beta=beta), w0, data, GradMode.NONE, clip,
                                     steps=3)
    w = [t.detach().expand(B, *t.shape).clone() for t in flatten_fast(w0)]
    m = [torch.zeros_like(t) for t in w]
    for i in range(3):
        leaves = [t.clone().requires_grad_(True) for t in w]
        g = torch.autograd.grad(_loss(unflatten_fast(leaves), data[2 * i], data[2 * i + 1]).sum(),
                                leaves)
        norm = torch.sqrt(sum(x.square().sum(dim=(1, 2)) for x in g))  # [B]
        s = torch.clamp(clip / norm, max=1.0)[:, None, None]
        m = [beta * mt + s * gt for mt, gt in zip(m, g)]
        w = [wt - LR * mt for wt, mt in zip(w, m)]
        upd = LR * torch.sqrt(sum(mt.square().sum(dim=(1, 2)) for mt in m))
        for got, want in zip(flatten_fast(history[i]), w):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        for got, want in zip(states[i]["momentum"], m):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norms[i], upd.float())


def test_momentum_first_step_is_the_official_one_for_any_beta() -> None:
    w0, data = _problem(torch.float32)
    ref = _run(_Reference(L), w0, data, GradMode.EXACT, CLIP_ON, steps=1)
    got = _run(MomentumSGD(L, beta=0.9), w0, data, GradMode.EXACT, CLIP_ON, steps=1)
    _assert_same(flatten_fast(ref[0][0]), flatten_fast(got[0][0]))
    # the update norm of β > 0 is ‖η·m‖ from m itself: equal up to rounding
    torch.testing.assert_close(ref[2][0], got[2][0])


def test_momentum_first_order_state_is_a_constant() -> None:
    w0, data = _problem(torch.float64)
    _, states, _, _ = _run(MomentumSGD(L), w0, data, GradMode.FIRST_ORDER, CLIP_ON, steps=2)
    assert not any(m.requires_grad for m in states[-1]["momentum"])
    _, states, _, _ = _run(MomentumSGD(L), w0, data, GradMode.EXACT, CLIP_ON, steps=2)
    assert all(m.requires_grad for m in states[-1]["momentum"])


# ---------------------------------------------------------------------------- learned lr
@pytest.mark.parametrize("clip", [CLIP_ON, CLIP_OFF])
def test_learned_lr_is_sgd_with_a_step_size_per_layer(clip: float) -> None:
    w0, data = _problem(torch.float64)
    opt = LearnedLRSGD(L).double()
    rho = torch.tensor([0.4, -0.7], dtype=torch.float64)
    with torch.no_grad():
        opt.log_lr_scale.copy_(rho)
    history, _, norms, _ = _run(opt, w0, data, GradMode.NONE, clip, steps=1)
    w = [t.detach().expand(B, *t.shape).clone().requires_grad_(True) for t in flatten_fast(w0)]
    g = torch.autograd.grad(_loss(unflatten_fast(w), data[0], data[1]).sum(), w)
    norm = torch.sqrt(sum(x.square().sum(dim=(1, 2)) for x in g))  # [B], over all layers
    s = torch.clamp(clip / norm, max=1.0)
    lr_j = LR * torch.exp(rho)  # [L]
    want = [wt - lr_j[i // 3] * s[:, None, None] * gt for i, (wt, gt) in enumerate(zip(w, g))]
    for got, ref in zip(flatten_fast(history[0]), want):
        torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-14)
    upd = s * torch.sqrt(sum((lr_j[i // 3] * gt).square().sum(dim=(1, 2))
                             for i, gt in enumerate(g)))
    torch.testing.assert_close(norms[0], upd.float())


def test_learned_lr_gets_an_outer_gradient() -> None:
    w0, data = _problem(torch.float64)
    grads = {}
    for mode in (GradMode.EXACT, GradMode.FIRST_ORDER):
        opt = LearnedLRSGD(L).double()
        _, _, _, outer = _run(opt, w0, data, mode, CLIP_ON, steps=1)
        outer.sum().backward()
        grads[mode] = opt.log_lr_scale.grad
        assert grads[mode] is not None and bool((grads[mode] != 0).all())
    # after one step the inner gradient (at W₀) does not depend on ρ: both modes agree
    torch.testing.assert_close(grads[GradMode.EXACT], grads[GradMode.FIRST_ORDER])


# -------------------------------------------------------------------- outer gradient checks
def _gradcheck_inputs(make: Callable[[int], InnerOptimizer]
                      ) -> tuple[InnerOptimizer, FastWeights, list[torch.Tensor], dict]:
    w0, data = _problem(torch.float64, seed=1, batch=2, dim=3, hidden=3)  # 2·27 weights
    opt = make(L).double()
    params = {name: (p.detach() + torch.tensor([0.3, -0.5], dtype=torch.float64))
              .requires_grad_(True) for name, p in opt.named_parameters()}
    return opt, w0, data, params


@pytest.mark.parametrize("clip", [CLIP_ON, CLIP_OFF])
@pytest.mark.parametrize("make", [ClippedSGD, lambda n: MomentumSGD(n, beta=0.7), LearnedLRSGD],
                         ids=["sgd", "momentum", "learned_lr"])
def test_exact_outer_gradient_gradcheck(make: Callable[[int], InnerOptimizer],
                                        clip: float) -> None:
    opt, w0, data, params = _gradcheck_inputs(make)
    names = list(params)

    def outer(*inputs: torch.Tensor) -> torch.Tensor:
        w = unflatten_fast(inputs[:3 * L])
        fast = expand_fast(w, 2)
        if not fast[0].w1.requires_grad:  # W₀ held: leaves for the inner step, as the model
            fast = map_fast(lambda t: t.detach().requires_grad_(True), fast)
        state = opt.init_state(fast)
        given = dict(zip(names, inputs[3 * L:]))
        for i in range(2):  # the second step sees the first's momentum
            loss = _loss(fast, data[2 * i], data[2 * i + 1])
            fast, state, _ = torch.func.functional_call(
                opt, given, (loss, fast, state, LR, clip, GradMode.EXACT))
        return _loss(fast, data[6], data[7])  # [2]

    inputs = tuple(flatten_fast(w0)) + tuple(params.values())
    # fast mode (a random projection of the Jacobian) over every input keeps this in seconds;
    # then the full Jacobian of the few meta-learned parameters alone (W₀ held constant).
    assert torch.autograd.gradcheck(outer, inputs, eps=1e-6, atol=1e-8, rtol=1e-5,
                                    fast_mode=True)
    if params:
        held = tuple(w.detach() for w in flatten_fast(w0)) + tuple(params.values())
        assert torch.autograd.gradcheck(outer, held, eps=1e-6, atol=1e-8, rtol=1e-5)


# ------------------------------------------------------------------- NONE mode and the state
@pytest.mark.parametrize("make", [ClippedSGD, MomentumSGD, LearnedLRSGD])
def test_none_mode_returns_detached_tensors(make: Callable[[int], InnerOptimizer]) -> None:
    w0, data = _problem(torch.float32)
    history, states, norms, _ = _run(make(L), w0, data, GradMode.NONE, CLIP_ON)
    tensors = [*flatten_fast(history[-1]), *norms,
               *(t for tensors in states[-1].values() for t in tensors)]
    assert not any(t.requires_grad for t in tensors)
    assert all(t.grad_fn is None for t in tensors)


def test_state_shapes() -> None:
    w0, _ = _problem(torch.float32)
    fast = expand_fast(w0, B)
    assert ClippedSGD(L).init_state(fast) == {} and LearnedLRSGD(L).init_state(fast) == {}
    state = MomentumSGD(L).init_state(fast)
    assert list(state) == ["momentum"]
    assert [m.shape for m in state["momentum"]] == [w.shape for w in flatten_fast(fast)]
    assert all(m.is_contiguous() and not m.requires_grad and not m.any()
               for m in state["momentum"])


@pytest.mark.parametrize("make", [ClippedSGD, MomentumSGD, LearnedLRSGD])
def test_rows_of_a_batch_step_as_a_batch_of_their_own(make: Callable[[int], InnerOptimizer]
                                                      ) -> None:
    # The engine keeps each sequence's fast weights and state, steps some rows, writes back.
    w0, data = _problem(torch.float32)
    opt = make(L)
    fast = expand_fast(w0, B)
    state = opt.init_state(fast)
    fast = map_fast(lambda w: w.detach().requires_grad_(True), fast)
    fast, state, _ = opt.step(_loss(fast, data[0], data[1]), fast, state, LR, CLIP_ON,
                              GradMode.NONE)  # a first step: a momentum state that is not 0
    rows = torch.tensor([0, 2])
    outs = []
    for f, s, x, y in ((fast, state, data[2], data[3]),
                       (index_fast(fast, rows), index_state(state, rows), data[2][rows],
                        data[3][rows])):
        f = map_fast(lambda w: w.clone().requires_grad_(True), f)
        outs.append(opt.step(_loss(f, x, y), f, s, LR, CLIP_ON, GradMode.NONE))
    (full, full_state, full_norm), (part, part_state, part_norm) = outs
    torch.testing.assert_close(flatten_fast(index_fast(full, rows)), flatten_fast(part),
                               rtol=0, atol=0)
    torch.testing.assert_close(index_state(full_state, rows), part_state, rtol=0, atol=0)
    torch.testing.assert_close(full_norm[rows], part_norm, rtol=0, atol=0)
    # stacking the rows back
    joined = cat_states([index_state(full_state, [0]), index_state(full_state, [1, 2])])
    torch.testing.assert_close(joined, full_state, rtol=0, atol=0)


def test_a_state_from_elsewhere_is_refused() -> None:
    w0, data = _problem(torch.float32)
    fast = map_fast(lambda w: w.detach().requires_grad_(True), expand_fast(w0, B))
    with pytest.raises(ValueError, match="init_state"):
        MomentumSGD(L).step(_loss(fast, data[0], data[1]), fast, {}, LR, 1.0, GradMode.NONE)
    with pytest.raises(ValueError, match="2 TTT layers"):
        ClippedSGD(L).step(_loss(fast, data[0], data[1]), fast[:1], {}, LR, 1.0, GradMode.NONE)
    with pytest.raises(ValueError, match="same keys"):
        cat_states([{}, {"momentum": []}])


# ----------------------------------------------------------------- fast weights, registry
def test_fast_weight_helpers() -> None:
    w0, _ = _problem(torch.float32)
    fast = expand_fast(w0, B)
    assert [p.w1.shape for p in fast] == [torch.Size([B, FF, D])] * L
    assert [p.w2.shape for p in fast] == [torch.Size([B, D, FF])] * L
    flat = flatten_fast(fast)
    assert len(flat) == 3 * L and flat[3] is fast[1].w1
    assert unflatten_fast(flat) == fast
    with pytest.raises(ValueError, match="three per layer"):
        unflatten_fast(flat[:4])
    assert all(not w.requires_grad for w in flatten_fast(detach_fast(fast)))
    assert all(w.dtype == torch.float64 for w in flatten_fast(fast_to(fast, torch.float64)))
    assert all(w.shape[0] == 2 for w in flatten_fast(index_fast(fast, [0, 2])))


def test_registry() -> None:
    assert set(INNER_OPTIMIZERS) == {"sgd", "momentum", "learned_lr"}
    assert all(cls.name == name for name, cls in INNER_OPTIMIZERS.items())
    assert type(build_inner_optimizer("sgd", 2)) is ClippedSGD
    opt = build_inner_optimizer("momentum", 2, beta=0.5)
    assert isinstance(opt, MomentumSGD) and opt.beta == 0.5
    with pytest.raises(ValueError, match="known: learned_lr, momentum, sgd"):
        build_inner_optimizer("adam", 2)
    with pytest.raises(ValueError, match="'sgd'"):
        build_inner_optimizer("sgd", 2, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        build_inner_optimizer("momentum", 2, beta=1.0)


def test_only_a_learned_lr_adds_state_dict_keys() -> None:
    # official checkpoints' exact key set: the default optimizer adds none
    for name, keys in (("sgd", set()), ("momentum", set()),
                       ("learned_lr", {"inner_optimizer.log_lr_scale"})):
        owner = nn.Module()
        owner.inner_optimizer = build_inner_optimizer(name, 3)
        assert set(owner.state_dict()) == keys
    assert LearnedLRSGD(3).log_lr_scale.shape == (3,)


# ------------------------------------------- low-precision leaves for steps without outer grad
@pytest.mark.parametrize("name", ["sgd", "momentum", "learned_lr"])
def test_bf16_leaves_give_the_autocast_step_bit_for_bit(name: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation under bf16 autocast: the inner gradient taken with respect to the bf16 copies
    the blocks computed with (``wrt``) gives the step that differentiating the fp32 fast weights
    through autocast's cast gives (gradient = that one widened), bit for bit."""
    from _helpers import tiny_model, tokens

    model = tiny_model(dtype=torch.float32, inner_optimizer=name)
    x, y = tokens(model, 2, 20)  # five chunks: four inner steps
    leaves_seen: list[bool] = []
    original = model._inner_leaves

    def spy(fast, h):  # type: ignore[no-untyped-def]
        leaves = original(fast, h)
        leaves_seen.append(leaves is not None and all(
            w.dtype == torch.bfloat16 and w.requires_grad for layer in leaves for w in layer))
        return leaves

    monkeypatch.setattr(model, "_inner_leaves", spy)
    runs = []
    for takes_wrt in (True, False):
        monkeypatch.setattr(type(model.inner_optimizer), "takes_wrt", takes_wrt)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, labels=y, return_fast_weights=True)
        runs.append(out)
    assert leaves_seen[:5] == [True] * 5 and not any(leaves_seen[5:])
    new, old = runs
    assert torch.equal(new.token_nll, old.token_nll)
    assert torch.equal(new.inner_update_norms, old.inner_update_norms)
    for a, b in zip(new.fast_weights, old.fast_weights):
        for key in a:
            assert a[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key


def test_wrt_is_refused_with_an_outer_gradient() -> None:
    w0, data = _problem(torch.float32)
    fast = flatten_fast(expand_fast(w0, B))
    loss = _loss(unflatten_fast(fast), data[0], data[1])
    with pytest.raises(ValueError, match="wrt"):
        inner_gradient(loss, fast, CLIP_OFF, GradMode.FIRST_ORDER, wrt=fast)
