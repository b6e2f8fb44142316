"""State-equivalence tests of the meta forward pass, in float64 on CPU."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close, grads, tiny_model, tokens
from tttlm import TTTForCausalLM
from tttlm.model.cache import ChunkKV, WholeSequence
from tttlm.model.model import KVPair
from tttlm.ops.attention import attention_backend
from tttlm.ttt.fast import flatten_fast

EXACT = 1e-12  # float64 paths that differ only in summation order


def test_inner_lr_zero_is_pretrain_mode() -> None:
    model = tiny_model()
    x, y = tokens(model, 2, 40)
    meta = model(x, labels=y, ttt=True, inner_lr=0.0)
    meta.loss.backward()
    g_meta = grads(model)
    pre = model(x, labels=y, ttt=False)
    pre.loss.backward()
    g_pre = grads(model)
    assert_close(meta.loss, pre.loss, atol=EXACT, name="loss")
    assert_close(meta.token_nll, pre.token_nll, atol=EXACT, name="token nll")
    for name in g_pre:
        assert_close(g_meta[name], g_pre[name], atol=EXACT, name=name)


def test_ttt_changes_the_predictions() -> None:
    model = tiny_model()
    x, y = tokens(model, 1, 40)
    with torch.no_grad():
        meta, pre = model(x, labels=y, ttt=True), model(x, labels=y, ttt=False)
    first = model.config.chunk_size
    # The first chunk is predicted before any update; later chunks with updated fast weights.
    assert_close(meta.token_nll[:, :first], pre.token_nll[:, :first], atol=EXACT, name="chunk 0")
    assert (meta.token_nll[:, first:] - pre.token_nll[:, first:]).abs().max() > 1e-3


def test_batch_equals_one_sequence_at_a_time() -> None:
    model = tiny_model()
    x, y = tokens(model, 3, 30)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.2
    out = model(x, labels=y, loss_mask=mask)
    out.loss.backward()
    g_batch = grads(model)
    singles, g_sum = [], None
    for b in range(3):
        one = model(x[b:b + 1], labels=y[b:b + 1], loss_mask=mask[b:b + 1])
        (one.loss / 3).backward()
        singles.append(one)
    g_single = grads(model)
    assert_close(out.token_nll, torch.cat([s.token_nll for s in singles]), atol=EXACT, name="nll")
    assert_close(out.inner_update_norms, torch.cat([s.inner_update_norms for s in singles]),
                 atol=EXACT, name="update norms")
    assert_close(out.loss, sum(s.loss for s in singles) / 3, atol=EXACT, name="loss")
    for name in g_batch:
        assert_close(g_batch[name], g_single[name], atol=1e-10, name=name)
    del g_sum


def test_checkpointed_equals_plain() -> None:
    model = tiny_model()
    x, y = tokens(model, 2, 37)
    plain = model(x, labels=y)
    plain.loss.backward()
    g_plain = grads(model)
    ckpt = model(x, labels=y, checkpoint_chunks=True)
    ckpt.loss.backward()
    g_ckpt = grads(model)
    assert_close(ckpt.loss, plain.loss, atol=0.0, name="loss")
    for name in g_plain:
        assert_close(g_ckpt[name], g_plain[name], atol=EXACT, name=name)


def _chunkwise_blocks(model: TTTForCausalLM, h: torch.Tensor, layers: list,
                      absolute: bool) -> torch.Tensor:
    """Run ``layers`` chunk by chunk over rolling caches (how the official pretrain mode runs)."""
    config = model.config
    B, T, _ = h.shape
    window, b = config.window, config.chunk_size
    empty = h.new_zeros(B, 0, config.num_heads, config.head_dim)
    caches: list[KVPair] = [(empty, empty) for _ in layers]
    outs = []
    for s in range(0, T, b):
        e = min(s + b, T)
        past = caches[0][0].shape[1]
        if absolute:
            cos, sin = model.rope_tables(torch.arange(s - past, e))
        else:
            cos, sin = model.rope_tables(torch.arange(window - past, window + e - s))
        x = h[:, s:e]
        for j, layer in enumerate(layers):
            cache = ChunkKV(*caches[j], s, window, (cos, sin), frozen=False)
            x = layer(x, cache)
            caches[j] = (cache.keys, cache.values)
        outs.append(x)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute-rope", "local-rope"])
def test_prefix_once_equals_prefix_chunk_by_chunk(absolute: bool) -> None:
    model = tiny_model()
    x, _ = tokens(model, 2, 45)
    h0 = model.embed(x)
    T = x.shape[1]
    cos, sin = model.rope_tables(torch.arange(T))
    once = h0
    for layer in model.layers:
        once = layer(once, WholeSequence((cos, sin), model.config.window,
                                         model.config.chunk_size))
    chunked = _chunkwise_blocks(model, h0, list(model.layers), absolute)
    assert_close(once, chunked, atol=1e-11, name="all blocks")


@pytest.mark.parametrize("T", [45, 9, 3])
def test_banded_attention_equals_naive(T: int) -> None:
    model = tiny_model(window=8, chunk_size=4)
    x, y = tokens(model, 2, T)
    fast = model(x, labels=y, ttt=False)
    fast.loss.backward()
    g_fast = grads(model)
    with attention_backend("naive"):
        slow = model(x, labels=y, ttt=False)
        slow.loss.backward()
    g_slow = grads(model)
    assert_close(fast.token_nll, slow.token_nll, atol=EXACT, name="nll")
    for name in g_fast:
        assert_close(g_fast[name], g_slow[name], atol=1e-11, name=name)


def test_no_grad_and_inference_mode_still_learn() -> None:
    model = tiny_model()
    x, y = tokens(model, 2, 30)
    train = model(x, labels=y)
    with torch.no_grad():
        nograd = model(x, labels=y)
    with torch.inference_mode():
        infer = model(x, labels=y)
    for other, name in ((nograd, "no_grad"), (infer, "inference_mode")):
        assert not other.loss.requires_grad
        assert_close(other.token_nll, train.token_nll, atol=EXACT, name=name)
        assert_close(other.inner_update_norms, train.inner_update_norms, atol=EXACT, name=name)


def test_constant_parameters_restores_what_required_grad() -> None:
    from tttlm.model.model import constant_parameters

    model = tiny_model()
    frozen = model.embed.weight
    frozen.requires_grad_(False)  # a parameter the caller froze stays frozen afterwards
    with pytest.raises(RuntimeError, match="inside"), constant_parameters(model):
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("inside")
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)


def test_linear_weights_in_restores_the_originals() -> None:
    from tttlm.model.model import linear_weights_in

    model = tiny_model(dtype=torch.float32)
    before = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="inside"), linear_weights_in(model.ttt_layers,
                                                                       torch.bfloat16):
        inside = dict(model.named_parameters())
        cast = {n for n, p in inside.items() if p.dtype == torch.bfloat16}
        # the TTT blocks' projections and MLPs; not their norms, not the prime MLPs
        assert cast and all(".attn.w" in n or ".mlp.w" in n for n in cast)
        assert {n for n in cast if n.startswith("layers.3.")} == {
            f"layers.3.{m}.{w}.weight" for m, w in (("attn", "wq"), ("attn", "wk"),
                                                    ("attn", "wv"), ("attn", "wo"),
                                                    ("mlp", "w1"), ("mlp", "w2"),
                                                    ("mlp", "w3"))}
        assert not any(n.startswith("layers.0.") for n in cast)  # a prefix block
        assert not any(inside[n].requires_grad for n in cast)
        assert torch.equal(inside["layers.3.mlp.w1.weight"],
                           before["layers.3.mlp.w1.weight"].to(torch.bfloat16))
        raise RuntimeError("inside")
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())


@pytest.mark.parametrize(("graphed", "group"), [(False, None), (True, None), (False, 1)])
def test_weights_cast_once_under_autocast_change_no_bit(
        graphed: bool, group: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast without an outer gradient the TTT blocks' constant weights are
    cast once per run: the same losses, logits and update norms bit for bit as autocast
    casting them at every product."""
    import contextlib

    from tttlm.model import model as model_module

    model = tiny_model(dtype=torch.float32)
    model.graph_chunks = graphed
    model.ttt_group = group
    x, y = tokens(model, 2, 40)
    entered = []
    real = model_module.linear_weights_in

    def spy(modules, dtype, store=None):  # type: ignore[no-untyped-def]
        # what the run finds to cast: everything once, then (groups' nested runs) nothing
        entered.append(sum(isinstance(lin, torch.nn.Linear) and "prime" not in name
                           and lin.weight.dtype == torch.float32
                           for m in modules for name, lin in m.named_modules()))
        return real(modules, dtype, store)

    def run() -> object:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, y, return_logits=True)

    monkeypatch.setattr(model_module, "linear_weights_in", spy)
    got = run()
    assert entered == [14] + [0] * (0 if group is None else 2)  # 2 blocks × 7 matrices
    monkeypatch.setattr(model_module, "linear_weights_in",
                        lambda modules, dtype, store=None: contextlib.nullcontext())
    ref = run()
    for name in ("token_nll", "logits", "inner_update_norms"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@pytest.mark.parametrize(("graphed", "group"), [(False, None), (True, None), (False, 1)])
def test_head_cast_once_under_autocast_changes_no_bit(
        graphed: bool, group: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast without an outer gradient the head (the tied embedding) is a bf16
    constant for the TTT chunks (a graph's products would cast it at every replay): the same
    losses, logits and update norms bit for bit; the fp32 original is back afterwards."""
    import contextlib

    from tttlm.model import model as model_module

    model = tiny_model(dtype=torch.float32)
    model.graph_chunks = graphed
    model.ttt_group = group
    x, y = tokens(model, 2, 40)
    original = model.embed.weight
    seen: list[torch.dtype] = []
    head_nll = model.head_nll

    def spy(*a: object, **k: object) -> object:
        seen.append(model.head_weight.dtype)
        return head_nll(*a, **k)

    monkeypatch.setattr(model, "head_nll", spy)

    def run() -> object:
        seen.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, y, return_logits=True)

    got = run()
    assert seen and set(seen) == {torch.bfloat16}
    assert model.embed.weight is original and original.dtype == torch.float32
    monkeypatch.setattr(model_module, "head_weight_in",
                        lambda model, dtype, store=None: contextlib.nullcontext())
    ref = run()
    assert set(seen) == {torch.float32}
    for name in ("token_nll", "logits", "inner_update_norms"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


def test_gradcheck_second_order_path() -> None:
    """Finite differences of the meta loss against the exact second-order outer gradient."""
    model = tiny_model(vocab_size=11, hidden_size=8, num_heads=2, intermediate_size=6,
                       num_layers=2, num_ttt_layers=1, window=6, chunk_size=3)
    x, y = tokens(model, 2, 11)
    with torch.no_grad():
        raw = model(x, labels=y, inner_lr=1.0).inner_update_norms
    # Put the clip threshold between the raw gradient norms so both branches are exercised.
    model.config.inner_clip = float(raw.flatten().median())
    names = ["layers.0.attn.wq.weight", "layers.1.attn.wk.weight", "layers.1.prime.w1.weight",
             "layers.1.prime.w2.weight", "layers.1.prime_norm.weight", "norm.weight"]
    params = dict(model.named_parameters())

    def loss(*tensors: torch.Tensor) -> torch.Tensor:
        state = {**params, **dict(zip(names, tensors))}
        out = torch.func.functional_call(model, state, (x,), {"labels": y, "inner_lr": 0.7})
        return out.loss

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _first_order_reference(model: TTTForCausalLM, x: torch.Tensor,
                           y: torch.Tensor) -> torch.Tensor:
    """Meta loss with every inner update replaced by the constant it took: W_i = W_0 + sg(ΔW_i).

    Its gradient is the first-order approximation by definition; it is computed here without
    the inner-step code.
    """
    with torch.no_grad():
        trajectory = model(x, labels=y, return_fast_weights=True).fast_weights
    config = model.config
    B, T = x.shape
    window, b = config.window, config.chunk_size
    h = model.embed(x)
    cos, sin = model.rope_tables(torch.arange(T))
    for layer in model.prefix_layers:
        h = layer(h, WholeSequence((cos, sin), window, b))
    local_cos, local_sin = model.rope_tables(torch.arange(window + b))
    names = model.fast_weight_names()
    w0 = flatten_fast(model.initial_fast_weights(B))
    empty = h.new_zeros(B, 0, config.num_heads, config.head_dim)
    caches: list[KVPair] = [(empty, empty) for _ in model.ttt_layers]
    losses = []
    for i, s in enumerate(range(0, T, b)):
        e = min(s + b, T)
        if i == 0:
            fast = w0
        else:
            fast = [w + (trajectory[i - 1][n] - w).detach() for w, n in zip(w0, names)]
        past = caches[0][0].shape[1]
        rope = (local_cos[window - past:window + e - s], local_sin[window - past:window + e - s])
        z = h[:, s:e]
        for j, layer in enumerate(model.ttt_layers):
            cache = ChunkKV(*caches[j], s, window, rope, frozen=False)
            z = layer(z, cache, tuple(fast[3 * j:3 * j + 3]))
            caches[j] = (cache.keys, cache.values)
        nll, _ = model.head_nll(z, y[:, s:e], False)
        losses.append(nll.mean(-1))
    return torch.stack(losses, 1).mean()


def test_first_order_matches_reference_and_differs_from_exact() -> None:
    model = tiny_model()
    x, y = tokens(model, 2, 24)  # chunk 4: six full chunks
    model(x, labels=y, grad_mode="first_order").loss.backward()
    g_first = grads(model)
    _first_order_reference(model, x, y).backward()
    g_ref = grads(model)
    model(x, labels=y).loss.backward()
    g_exact = grads(model)
    for name in g_ref:
        assert_close(g_first[name], g_ref[name], atol=1e-11, name=name)
    prime = "layers.3.prime.w1.weight"
    rel = (g_first[prime] - g_exact[prime]).norm() / g_exact[prime].norm()
    assert rel > 1e-3, f"first-order gradient equals the exact one (rel diff {rel:.2e})"


def test_gradient_flows_through_kv_caches() -> None:
    """Cutting the caches out of the graph must change the gradient (it leaves the loss)."""
    model = tiny_model()
    x, y = tokens(model, 1, 24)
    model(x, labels=y).loss.backward()
    g = grads(model)
    original = model.ttt_layers[0].forward

    def detached(h, cache, *args, **kwargs):  # type: ignore[no-untyped-def]
        cache.keys, cache.values = cache.keys.detach(), cache.values.detach()
        return original(h, cache, *args, **kwargs)

    model.ttt_layers[0].forward = detached  # type: ignore[method-assign]
    model(x, labels=y).loss.backward()
    g_cut = grads(model)
    name = "layers.2.attn.wk.weight"
    assert (g[name] - g_cut[name]).norm() / g[name].norm() > 1e-3


def test_lean_head_equals_logits_head() -> None:
    """The default head (no logits kept) against the plain one used with return_logits=True."""
    model = tiny_model()
    x, y = tokens(model, 2, 30)
    lean = model(x, labels=y)
    lean.loss.backward()
    g_lean = grads(model)
    model.lean_head = False
    plain = model(x, labels=y)
    plain.loss.backward()
    g_plain = grads(model)
    assert_close(lean.token_nll, plain.token_nll, atol=EXACT, name="nll")
    for name in g_plain:
        assert_close(g_lean[name], g_plain[name], atol=1e-11, name=name)
