"""The ``gated_deltanet`` and ``mamba2`` variants: SWA blocks with a Gated DeltaNet / Mamba 2
block (their recurrences from flash-linear-attention) in every ``global_every``; the engine's
equivalence with the training forward and its sessions are in test_inference_engine /
test_inference_state."""

from __future__ import annotations

import sys

import pytest
import torch

from _helpers import tiny_model, tokens
from tttlm import TTTConfig, TTTForCausalLM
from tttlm.errors import UserError

pytest.importorskip("fla")


VARIANTS = pytest.mark.parametrize("variant", ["gated_deltanet", "mamba2"])


def model(variant: str = "gated_deltanet") -> TTTForCausalLM:
    return tiny_model(variant=variant, num_ttt_layers=None, global_every=2)


@VARIANTS
def test_blocks_parameters_and_gradients(variant: str) -> None:
    m = model(variant)
    assert [layer.recurrent is not None for layer in m.layers] == [False, True, False, True]
    for size in ("125m", "760m", "3b"):
        with torch.device("meta"):
            e2e, other = (TTTForCausalLM(TTTConfig.from_preset(size, v)).num_parameters()
                          for v in ("e2e", variant))
        assert abs(other / e2e - 1) < 0.03, size
    x, y = tokens(m, 2, 20)
    m(x, y, ttt=False).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


@VARIANTS
def test_the_rule_reads_past_the_window(variant: str) -> None:
    """A token far beyond the window changes later outputs only through the recurrent
    blocks' state: with a decay that empties the state at every token the model forgets it
    like SWA."""
    m = model(variant)
    mixers = [layer.recurrent for layer in m.layers if layer.recurrent is not None]
    with torch.no_grad():  # slow decay (the test helper's random norms make it fast)
        for mixer in mixers:
            mixer.A_log.zero_()
            mixer.dt_bias.fill_(-6.0)
    window = m.config.window
    x, y = tokens(m, 1, 4 * window)
    far = 3 * window  # past the receptive field of 2 SWA blocks and 2 short convolutions
    other = x.clone()
    other[0, 0] = (other[0, 0] + 1) % m.config.vocab_size
    with torch.no_grad():
        a, b = m(x, y, ttt=False).token_nll, m(other, y, ttt=False).token_nll
        assert (a[0, far:] - b[0, far:]).abs().max() > 1e-9
        for mixer in mixers:
            mixer.A_log.fill_(10.0)  # g = -e^10 softplus(..): exp(g) underflows to 0
        a, b = m(x, y, ttt=False).token_nll, m(other, y, ttt=False).token_nll
    assert torch.equal(a[0, far:], b[0, far:])


@VARIANTS
def test_without_fla_one_line(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = model(variant)
    x, y = tokens(m, 1, 8)
    monkeypatch.setitem(sys.modules, "fla", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"need flash-linear-attention; install it with pip "
                                        r"install 'tttlm\[fla\]'"):
        m(x, y, ttt=False)


@VARIANTS
def test_bf16_model_decodes_with_float32_state(variant: str) -> None:
    """A bf16 model keeps the recurrent state in float32, and its decoding strays from the
    float64 model's no farther than its own bf16 training forward does (this test model's
    large weights make bf16 coarse: the bound is measured, not assumed)."""
    import copy

    from tttlm.inference import Engine

    m = model(variant)
    low_model = copy.deepcopy(m).to(torch.bfloat16)
    x, _ = tokens(m, 2, 12)
    with torch.no_grad():
        _, exact = m.head_nll(m.run_blocks(m.embed(x), list(m.layers)), None, True)
        _, coarse = low_model.head_nll(low_model.run_blocks(low_model.embed(x),
                                                            list(low_model.layers)), None, True)
    bound = (coarse.double() - exact).abs().max() + 0.1
    low = Engine(low_model)
    logits, state = low.prefill(x[:, :5])
    assert all(t.dtype == torch.float32 for t in state.mixers)
    for t in range(5, 12):
        assert (logits.double() - exact[:, t - 1]).abs().max() <= bound, t
        logits, state = low.step(state, x[:, t])


@pytest.mark.parametrize(("capability", "triton", "tilelang", "refused"), [
    ((9, 0), "3.6.0", False, True),     # H100/H200 with the Triton of torch 2.11
    ((9, 0), "3.4.0", False, True),
    ((9, 0), "3.7.1", False, False),    # fixed
    ((9, 0), "3.3.1", False, False),    # before the regression
    ((9, 0), "3.6.0", True, False),     # tilelang supplies the kernel
    ((8, 0), "3.6.0", False, False),    # A100
    ((10, 0), "3.6.0", False, False),   # Blackwell
])
def test_hopper_backward_refusal(capability: tuple[int, int], triton: str, tilelang: bool,
                                 refused: bool) -> None:
    from tttlm.ops.gated_delta import hopper_backward_refusal

    reason = hopper_backward_refusal(capability, triton, tilelang)
    assert (reason is not None) == refused
    if reason:
        assert "3.7.1" in reason and "tilelang" in reason and "\n" not in reason


def testkernel_inputs_share_one_dtype() -> None:
    """fla's Triton kernels refuse mixed q/k/v dtypes (autocast gives bf16 projections beside
    float32 normalised keys): the half dtype wins when present, else float32."""
    from tttlm.ops.gated_delta import kernel_inputs

    f32, bf16 = torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.bfloat16)
    assert [x.dtype for x in kernel_inputs(f32, bf16, f32)] == [torch.bfloat16] * 3
    f64 = torch.ones(2, dtype=torch.float64)
    assert [x.dtype for x in kernel_inputs(f64, f32, f32)] == [torch.float32] * 3
