"""A block's normed input cast once for its several products under autocast, without gradient
(tttlm.model.layers.products_input): the same values as each product's own cast, so the
same results bit for bit; compiled, one buffer instead of one per product; with a gradient,
the products keep their own casts."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from _helpers import tiny_model, tokens
from tttlm.model import layers


def _model() -> torch.nn.Module:
    return tiny_model(dtype=torch.float32, hidden_size=160, num_heads=2, intermediate_size=96,
                      num_layers=4, num_ttt_layers=2, window=32, chunk_size=8, vocab_size=300)


def test_the_same_results_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    x, y = tokens(model, 2, 60)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, labels=y)
        return out.token_nll, out.inner_update_norms

    once = run()
    monkeypatch.setattr(layers, "products_input", lambda t: t)
    assert all(torch.equal(a, b) for a, b in zip(once, run(), strict=True))


def test_only_without_gradient_and_under_autocast() -> None:
    x = torch.randn(2, 3)
    assert layers.products_input(x) is x  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = layers.products_input(x)
        assert cast.dtype == torch.bfloat16 and torch.equal(cast, x.to(torch.bfloat16))
        leaf = x.clone().requires_grad_(True)
        assert layers.products_input(leaf) is leaf
        wide = x.double()
        assert layers.products_input(wide) is wide  # (autocast leaves fp64 alone)


def test_compiled_block_writes_its_normed_input_once() -> None:
    torch._dynamo.reset()
    model = _model()
    block = model.layers[0]
    h = torch.randn(1, 24, 160)
    rope = model.rope_tables(torch.arange(24))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, codes = run_and_get_code(torch.compile(layers._rotated_inputs), block, h, rope)
    normed = [line for code in codes for line in code.splitlines()
              if "empty_strided_cpu((1, 24, 160)" in line and "bfloat16" in line]
    assert len(normed) == 1, normed
