"""Causality of every variant's training forward (float64, CPU): a token changed at position
``t`` leaves the NLL of every earlier target unchanged and does change later ones. For e2e this
is the meta forward: a chunk is predicted before its own inner update, so a later chunk's
tokens can reach only later chunks through the fast weights; a leak there would show up as a
training loss that is too good to be true."""

from __future__ import annotations

import pytest
import torch

from _helpers import GDN, MAMBA2, tiny_model, tokens

T = 40  # ten chunks of 4, past the window of 12
VARIANTS = ["e2e", "swa", "full", "hybrid", "ttt_kvb", GDN, MAMBA2]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", [2, 13, 22, 37])  # chunk starts and middles, inside and past W
def test_changing_a_token_changes_only_later_targets(variant: str, t: int) -> None:
    extra = {} if variant == "e2e" else {"num_ttt_layers": None}
    if variant in ("hybrid", "ttt_kvb", "gated_deltanet", "mamba2"):
        extra["global_every"] = 2
    model = tiny_model(variant=variant, **extra)  # type: ignore[arg-type]
    x, _ = tokens(model, 2, T + 1)
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 1) % model.config.vocab_size
    with torch.no_grad():
        # labels[:, p] is the token after p: the target at t - 1 is the changed token itself
        before = model(x[:, :-1], x[:, 1:]).token_nll
        after = model(changed[:, :-1], changed[:, 1:]).token_nll
    assert before is not None and after is not None
    diff = (before - after).abs()
    assert float(diff[:, : t - 1].max()) <= 1e-12
    # The change does reach later targets (else the check above could not fail).
    assert float(diff[:, t:].max()) > 1e-6
