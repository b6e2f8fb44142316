"""A whole sequence's sliding-window attention, forward only, through the Triton window pass
(tttlm.ops.attention.window_sequence): against the naive reference in fp32 and fp64 under
Triton's interpreter on a CPU (and in bf16/fp16 on CUDA), which calls take it, and a TTT
model's scoring forward through it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _helpers import assert_within, kernel_dtypes, triton_or_skip

triton = triton_or_skip()

from tttlm.ops.attention import (  # noqa: E402
    AutoBackend,
    attention_backend,
    naive,
    register_attention_backend,
    sequence_attention,
    window_sequence,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = kernel_dtypes(DEVICE)
TOL = {torch.float64: 2e-6, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _operands(B: int, T: int, H: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(T + d)
    return [torch.randn(B, T, H, d, generator=gen).to(DEVICE, dtype) for _ in range(3)]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
               ) -> torch.Tensor:
    pos = torch.arange(q.shape[1], device=q.device)
    return naive.naive_attention(q.double(), k.double(), v.double(),
                                 naive.window_mask(pos, pos, window))


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per call of the pass (a spy around it)."""
    seen: list[bool] = []
    original = window_sequence.window_sequence_attention

    def counted(*a: object, **kw: object) -> torch.Tensor:
        seen.append(True)
        return original(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(window_sequence, "window_sequence_attention", counted)
    return seen


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, window, d", [
    (2, 200, 64, 80),    # the window's edge crosses many key tiles
    (1, 150, 150, 80),   # a window as long as the sequence: causal
    (2, 100, 500, 48),   # a window longer than the sequence
    (1, 130, 7, 80),     # a window shorter than a tile
])
def test_equals_naive_window_attention(B: int, T: int, window: int, d: int,
                                       dtype: torch.dtype,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With the sequence tiles (128 x 64) and with tiles of 16: the naive reference's output."""
    q, k, v = _operands(B, T, 2, d, dtype)
    ref = _reference(q, k, v, window)
    for config in (None, "16,16,4,1"):
        if config:
            monkeypatch.setenv("TTTLM_WINDOW_SEQ", config)
        got = window_sequence.window_sequence_attention(q, k, v, window)
        assert got.dtype == dtype and got.shape == q.shape
        assert_within(got, ref, TOL[dtype])


def test_strided_views_and_autocast_dtype() -> None:
    """Views of a fused projection (a row stride wider than the heads) are read in place;
    operands of two dtypes are cast to one, as the other paths cast them."""
    dtype = DTYPES[0]
    B, T, H, d, window = 1, 96, 2, 80, 40
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3, H, d, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.unbind(2)
    ref = _reference(q, k, v, window)
    assert_within(window_sequence.window_sequence_attention(q, k, v, window), ref, TOL[dtype])
    if DEVICE == "cpu":  # fp32 queries beside fp64 keys: promoted to fp64
        got = window_sequence.window_sequence_attention(q.float(), k.double(), v.double(),
                                                        window)
        assert got.dtype == torch.float64


def test_which_calls_it_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No window (full attention keeps SDPA: it is the baseline), an autograd graph wanted, or
    a head width the libraries do not pad: refused. On a CPU only under the interpreter."""
    q, k, v = _operands(1, 64, 2, 80, DTYPES[0])
    can = window_sequence.window_sequence_can_run
    assert can(q, k, v, 32)
    assert not can(q, k, v, None)
    assert not can(*(x[..., :64] for x in (q, k, v)), 32)
    # rows past a 32-bit offset (900K tokens of 32 heads of 80): refused, never run
    long = torch.empty(1, 900_000, 32, 80, device="meta", dtype=q.dtype)
    assert not can(long, long, long, 8192)
    if DEVICE == "cpu":  # (a meta tensor counts as a CPU one: the interpreter's switch)
        assert can(long[:, :800_000], long[:, :800_000], long[:, :800_000], 8192)
    grad_q = q.clone().requires_grad_()
    assert not can(grad_q, k, v, 32)
    with torch.no_grad():
        assert can(grad_q, k, v, 32)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not can(q, k, v, 32)


@pytest.mark.parametrize("name, takes", [("auto", DEVICE == "cuda"), ("cudnn-sequence", False),
                                         ("flash-window", DEVICE == "cuda")])
def test_which_backends_take_it(name: str, takes: bool, calls: list[bool]) -> None:
    """``auto`` takes the pass on CUDA only (on a CPU it would run under the interpreter),
    ``cudnn-sequence`` never; the output is the same either way."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q, k, v = _operands(2, 192, 2, 80, dtype)
    for window in (64, 192):
        calls.clear()
        with torch.no_grad(), attention_backend(name):
            got = sequence_attention(q, k, v, window, 32)
        assert calls == ([True] if takes else [])
        assert_within(got, _reference(q, k, v, window), TOL[dtype])


class _EverywhereBackend(AutoBackend):
    """``auto`` with the pass wherever it runs (CPU tensors too, under the interpreter)."""

    name = "window-sequence-everywhere"

    def sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None, block: int) -> torch.Tensor:
        if window_sequence.window_sequence_can_run(q, k, v, window):
            assert window is not None
            return window_sequence.window_sequence_attention(q, k, v, window)
        return super().sequence(q, k, v, window, block)


@pytest.mark.skipif(DEVICE != "cpu", reason="fp64 under the interpreter, on a CPU")
def test_scoring_forward_equals_the_reference(calls: list[bool]) -> None:
    """A tiny e2e model with heads of 48 (which the libraries pad and the pass splits into
    32 + 16), its sequence longer than the window: the prefix blocks through the pass give
    the naive backend's loss and fast weights, in fp64."""
    from tttlm import TTTConfig, TTTForCausalLM

    cfg = dataclasses.replace(TTTConfig.from_preset("tiny", "e2e"), head_dim=48)
    torch.manual_seed(0)
    model = TTTForCausalLM(cfg).to(DEVICE, torch.float64).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 4 * cfg.chunk_size + 1), device=DEVICE)
    assert ids.shape[1] - 1 > cfg.window
    register_attention_backend(_EverywhereBackend(), replace=True)
    results = {}
    for name in ("naive", _EverywhereBackend.name):
        with torch.no_grad(), attention_backend(name):
            results[name] = model(ids[:, :-1], labels=ids[:, 1:], ttt=True,
                                  return_fast_weights=True)
    prefix = cfg.num_layers - cfg.num_ttt_layers
    assert len(calls) == prefix > 0
    a, b = results["naive"], results[_EverywhereBackend.name]
    torch.testing.assert_close(b.token_nll, a.token_nll, rtol=1e-6, atol=1e-6)
    for wa, wb in zip(a.fast_weights, b.fast_weights, strict=True):
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(DEVICE != "cuda", reason="cuDNN's pieces: CUDA")
@pytest.mark.parametrize("B, T", [(1, 16384), (2, 8192)])
def test_cuda_equals_cudnn(B: int, T: int) -> None:
    """At 3b's heads (32 of 80) and window (8192), bf16: within bf16 rounding of what
    ``auto`` ran before (cuDNN's pieces past the window, SDPA's causal attention within)."""
    q, k, v = _operands(B, T, 32, 80, torch.bfloat16)
    with torch.no_grad():
        got = window_sequence.window_sequence_attention(q, k, v, 8192)
        with attention_backend("cudnn-sequence"):
            want = sequence_attention(q, k, v, 8192, 1024)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 2e-2 * max(want.float().abs().max().item(), 1.0), err
