"""Awkward shapes: partial last chunks, windows longer than the sequence, tiny sequences."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close, grads, tiny_model, tokens
from tttlm import TTTConfig, TTTForCausalLM
from tttlm.ops.attention import attention_backend

CASES = {
    "B1-T63-partial": (1, 63, {}),
    "B3-T30-partial": (3, 30, {}),
    "B2-T10-window-gt-T": (2, 10, {"window": 64}),
    "B2-T3-shorter-than-chunk": (2, 3, {}),
    "B3-T16-exact": (3, 16, {}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_meta_forward_and_backward_run(case: str) -> None:
    batch, length, overrides = CASES[case]
    model = tiny_model(**overrides)
    x, y = tokens(model, batch, length)
    out = model(x, labels=y)
    b = model.config.chunk_size
    n = -(-length // b)
    assert out.token_nll.shape == (batch, length)
    assert out.chunk_losses.shape == (batch, n)
    assert out.inner_update_norms.shape == (batch, n - 1)
    out.loss.backward()
    g = grads(model)
    assert all(torch.isfinite(t).all() for t in g.values())
    assert g["layers.3.prime.w1.weight"].abs().sum() > 0 or n == 1


def test_partial_chunk_weighting() -> None:
    """A last chunk of c tokens weighs c/b; full chunks give the official mean of chunk means."""
    model = tiny_model()
    x, y = tokens(model, 2, 30)  # chunk 4: 7 full chunks and one of 2 tokens
    with torch.no_grad():
        out = model(x, labels=y)
    weights = torch.tensor([1.0] * 7 + [0.5], dtype=torch.float64)
    expected = ((out.chunk_losses * weights).sum(-1) / weights.sum()).mean()
    assert_close(out.loss, expected, atol=1e-14, name="weighted")
    with torch.no_grad():
        full = model(x[:, :28], labels=y[:, :28])
    assert_close(full.loss, full.chunk_losses.mean(), atol=1e-14, name="mean of chunk means")


@pytest.mark.parametrize("cut", [3, 17, 28, 29])
def test_prefix_of_a_sequence_is_predicted_identically(cut: int) -> None:
    """Causality of the whole meta forward: later tokens never change earlier predictions."""
    model = tiny_model()
    x, y = tokens(model, 2, 40)
    with torch.no_grad():
        whole = model(x, labels=y)
        part = model(x[:, :cut], labels=y[:, :cut])
    assert_close(part.token_nll, whole.token_nll[:, :cut], atol=1e-12, name=f"first {cut}")


def test_swa_with_long_window_equals_full_attention() -> None:
    torch.manual_seed(0)
    swa = TTTForCausalLM(TTTConfig(variant="swa", window=64, chunk_size=8)).double()
    full = TTTForCausalLM(TTTConfig(variant="full", window=64, chunk_size=8)).double()
    full.load_state_dict(swa.state_dict())
    x, y = tokens(swa, 2, 40)
    with torch.no_grad():
        a, b = swa(x, labels=y), full(x, labels=y)
    assert_close(a.token_nll, b.token_nll, atol=1e-12, name="swa vs full")
    assert_close(a.loss, a.token_nll.mean(), atol=1e-14, name="token mean loss")


@pytest.mark.parametrize("variant", ["swa", "full"])
def test_baselines_against_naive_attention(variant: str) -> None:
    torch.manual_seed(0)
    model = TTTForCausalLM(TTTConfig(variant=variant, window=8, chunk_size=4)).double()
    x, y = tokens(model, 2, 37)
    with torch.no_grad():
        fast = model(x, labels=y)
        with attention_backend("naive"):
            slow = model(x, labels=y)
    assert_close(fast.token_nll, slow.token_nll, atol=1e-12, name=variant)
    with pytest.raises(ValueError, match="ttt=True needs an e2e model"):
        model(x, labels=y, ttt=True)


def test_labels_ignore_index_and_mask() -> None:
    model = tiny_model()
    x, y = tokens(model, 1, 16)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 5] = False
    y_ignored = y.clone()
    y_ignored[0, 5] = -100
    with torch.no_grad():
        a = model(x, labels=y, loss_mask=mask)
        b = model(x, labels=y_ignored)
    assert_close(a.chunk_losses, b.chunk_losses, atol=1e-14, name="ignore index == mask")


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x[0], y), "input_ids must be a \\[batch, length\\] tensor"),
    (lambda x, y: (x.float(), y), "integer tensor"),
    (lambda x, y: (x + 1000, y), "outside the model's vocabulary"),
    (lambda x, y: (x, y[:, :-1]), "labels shape"),
    (lambda x, y: (x, y + 1000), "labels contain id"),
    (lambda x, y: (x, None), "pass labels"),
])
def test_bad_inputs_raise_clear_errors(bad, message) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model()
    x, y = tokens(model, 2, 8)
    args = bad(x, y)
    with pytest.raises(ValueError, match=message):
        model(args[0], labels=args[1])


def test_logits_without_labels_in_pretrain_mode() -> None:
    model = tiny_model()
    x, _ = tokens(model, 2, 9)
    with torch.no_grad():
        out = model(x, ttt=False)
    assert out.logits is not None and out.logits.shape == (2, 9, model.config.vocab_size)
    assert out.loss is None


def test_frozen_weights() -> None:
    """Frozen prime MLPs still learn at test time; a fully frozen model needs no no_grad."""
    model = tiny_model()
    x, y = tokens(model, 2, 20)
    with torch.no_grad():
        ref = model(x, labels=y).token_nll
    for layer in model.ttt_layers:
        layer.prime.requires_grad_(False)
    out = model(x, labels=y)
    out.loss.backward()
    assert_close(out.token_nll, ref, atol=1e-12, name="frozen primes")
    g = grads(model)
    assert "layers.3.prime.w1.weight" not in g and g["layers.3.attn.wq.weight"].abs().sum() > 0
    model.requires_grad_(False)
    assert_close(model(x, labels=y).token_nll, ref, atol=1e-12, name="all frozen")


def test_fast_weight_gradients_come_out_in_the_weights_layout() -> None:
    """The per-sequence prime MLP: the values of ``x Wᵀ`` products, and gradients that are
    contiguous like the weights (the inner step's norms and update then read them without a
    copy or strided access)."""
    from tttlm.model.layers import swiglu

    g = torch.Generator().manual_seed(0)
    B, n, D, F = 3, 5, 8, 12
    x = torch.randn(B, n, D, generator=g, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(B, F, D, generator=g, dtype=torch.float64, requires_grad=True)
              for _ in range(2))
    w2 = torch.randn(B, D, F, generator=g, dtype=torch.float64, requires_grad=True)
    y = swiglu(x, w1, w2, w3)
    ref = (torch.nn.functional.silu(x @ w1.mT) * (x @ w3.mT)) @ w2.mT
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    assert y.is_contiguous()
    grads = torch.autograd.grad(y.pow(2).sum(), (x, w1, w2, w3))
    refs = torch.autograd.grad(ref.pow(2).sum(), (x, w1, w2, w3))
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(t.is_contiguous() for t in grads[1:])
