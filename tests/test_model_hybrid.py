"""The hybrid baseline: sliding-window blocks with one full-attention block in every
``global_every`` (the last of each group), the rest of the block shared with ``swa``/``full``."""

from __future__ import annotations

import pytest
import torch

from _helpers import tiny_model, tokens
from tttlm import TTTConfig, TTTForCausalLM
from tttlm.bench.prefill import prefill_flops
from tttlm.model.cache import WholeSequence
from tttlm.ops.attention import attention_backend


def nll(model: TTTForCausalLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with attention_backend("naive"), torch.no_grad():
        out = model(x, y, ttt=False)
    assert out.token_nll is not None
    return out.token_nll


def test_placement_is_the_last_block_of_each_group() -> None:
    assert TTTConfig.from_preset("125m", "hybrid").full_attention_layers == [5, 11]
    assert TTTConfig.from_preset("3b", "hybrid").full_attention_layers == [5, 11, 17, 23, 29]
    config = TTTConfig.from_preset("tiny", "hybrid", global_every=2)
    assert [config.layer_window(i) for i in range(4)] == [64, None, 64, None]
    assert TTTConfig.from_preset("tiny", "swa").full_attention_layers == []
    assert TTTConfig.from_preset("tiny", "full").full_attention_layers == [0, 1, 2, 3]


@pytest.mark.parametrize("value, message", [
    (1, "must be an integer >= 2"), (True, "must be an integer >= 2"),
    (5, "exceeds num_layers=4"),
])
def test_bad_global_every(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TTTConfig.from_preset("tiny", "hybrid", global_every=value)


def test_same_parameters_as_swa_and_fingerprints_apart() -> None:
    for size in ("125m", "760m", "3b"):
        swa, hybrid = (TTTConfig.from_preset(size, v) for v in ("swa", "hybrid"))
        with torch.device("meta"):
            assert (TTTForCausalLM(swa).num_parameters()
                    == TTTForCausalLM(hybrid).num_parameters())
    configs = [TTTConfig.from_preset("tiny", "hybrid", global_every=g) for g in (2, 4)]
    assert len({c.fingerprint() for c in configs}) == 2


def test_hybrid_mixes_window_and_full_attention() -> None:
    """Beyond the window the hybrid differs from both swa and full (same weights); within the
    window all three are one function; and its blocks attend as ``layer_window`` says."""
    models = {v: tiny_model(variant=v, num_ttt_layers=None, global_every=2)
              for v in ("swa", "full", "hybrid")}
    state = models["hybrid"].state_dict()
    for m in models.values():
        m.load_state_dict(state)
    window = models["hybrid"].config.window
    x, y = tokens(models["hybrid"], 2, 3 * window)
    out = {v: nll(m, x, y) for v, m in models.items()}
    inside = slice(0, window)
    for v in ("swa", "full"):
        assert torch.allclose(out["hybrid"][:, inside], out[v][:, inside], atol=1e-12, rtol=0)
        assert (out["hybrid"][:, window:] - out[v][:, window:]).abs().max() > 1e-4
    # A reference that builds the blocks' caches itself, window by window.
    model = models["hybrid"]
    T = x.shape[1]
    rope = model.rope_tables(torch.arange(T))
    with attention_backend("naive"), torch.no_grad():
        h = model.embed(x)
        for i, layer in enumerate(model.layers):
            w = window if i % 2 == 0 else None
            h = layer(h, WholeSequence(rope, w, model.config.chunk_size))
        ref, _ = model.head_nll(h, y, False)
    assert torch.allclose(ref, out["hybrid"], atol=1e-12, rtol=0)


def test_prefill_flops_count_each_block_window() -> None:
    T = 4096
    swa, full, hybrid = (TTTConfig.from_preset("125m", v, window=1024)
                         for v in ("swa", "full", "hybrid"))
    f_swa, f_full, f_hybrid = (prefill_flops(c, T) for c in (swa, full, hybrid))
    assert f_swa < f_hybrid < f_full
    # 2 of 12 blocks full: the attention part is 10/12 swa's plus 2/12 full's
    assert f_hybrid - f_swa == pytest.approx((f_full - f_swa) * 2 / 12)
