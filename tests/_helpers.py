"""Shared test helpers: one error measure for every numerical comparison."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tttlm import TTTConfig, TTTForCausalLM


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray, *,
                 atol: float | None = None, rel_l2: float | None = None, name: str = "") -> None:
    """Fail unless ``actual`` matches ``expected``; report max-abs and relative-L2 error.

    NaN anywhere fails. ``atol`` bounds the max absolute error, ``rel_l2`` the relative L2 error
    ``|a - e| / |e|``; give at least one, next to the call, with the reason for its size.
    """
    a, e = _np(actual), _np(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert not np.isnan(a).any(), f"{name}: NaN in result"
    max_abs = float(np.abs(a - e).max()) if a.size else 0.0
    rel = float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))
    msg = f"{name}: max-abs {max_abs:.3e}, rel-L2 {rel:.3e}"
    assert atol is not None or rel_l2 is not None, "give a tolerance"
    if atol is not None:
        assert max_abs <= atol, f"{msg} > atol {atol:.1e}"
    if rel_l2 is not None:
        assert rel <= rel_l2, f"{msg} > rel-L2 {rel_l2:.1e}"


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, perturb_norms: bool = True,
               **overrides: object) -> TTTForCausalLM:
    """A small random model; norms perturbed so that a misplaced norm shows up."""
    fields = dict(vocab_size=53, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=24,
                  num_ttt_layers=2, window=12, chunk_size=4, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    config = TTTConfig(**fields)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = TTTForCausalLM(config).to(dtype)
    # A larger init than the official 0.02 makes the inner step matter at this size.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
            elif perturb_norms:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def tokens(model: TTTForCausalLM, batch: int, length: int,
           seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (batch, length + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def grads(model: TTTForCausalLM) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# Gated DeltaNet runs through flash-linear-attention (the fla extra; the test set-up installs it).
NEEDS_FLA = pytest.mark.skipif(importlib.util.find_spec("fla") is None,
                               reason="flash-linear-attention is not installed")
GDN = pytest.param("gated_deltanet", marks=NEEDS_FLA)
MAMBA2 = pytest.param("mamba2", marks=NEEDS_FLA)


def memory_windows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``window`` (how old a passage is when indexed) of every memory a recall policy
    makes from now on, in order; the list fills as the test runs."""
    from tttlm.memory.recall import RecallPolicy

    windows: list[int] = []
    new_memory = RecallPolicy.new_memory

    def spy(policy, engine):  # type: ignore[no-untyped-def]
        memory = new_memory(policy, engine)
        windows.append(memory.window)
        return memory

    monkeypatch.setattr(RecallPolicy, "new_memory", spy)
    return windows


def stand_in_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Let the engine take its CUDA-graph route on the CPU: a "capture" runs the warm-up,
    then every replay calls what a graph would replay. Returns one entry per capture (its
    ``("capture",)`` placeholder; the engine-graph tests replace it with the graph's key)."""
    from tttlm.inference import engine as engine_module

    captured: list[tuple] = []

    def capture(run, warm, device):  # type: ignore[no-untyped-def]
        warm()
        captured.append(("capture",))
        return run

    monkeypatch.setattr(engine_module, "can_capture", lambda device: True)
    monkeypatch.setattr(engine_module, "capture", capture)
    return captured


def load_benchmark(name: str) -> Any:
    """The script ``benchmarks/<name>.py`` imported as a module (scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module


def triton_or_skip() -> Any:
    """Triton for a kernel test module, called at its top before anything imports a kernel:
    without a GPU, its CPU interpreter (``TRITON_INTERPRET=1``, read at ``@triton.jit`` time);
    the module is skipped when Triton is missing or its interpreter is too old."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    version = tuple(map(int, triton.__version__.split(".")[:2]))
    if not torch.cuda.is_available() and version < (3, 9):
        # Triton 3.6's interpreter turns runtime loop bounds into 1-element NumPy arrays and
        # calls int() on them, which current NumPy refuses; 3.9 is the oldest verified here.
        pytest.skip("the Triton CPU interpreter before 3.9 cannot run these kernels",
                    allow_module_level=True)
    return triton


def chunk_operands(B: int, c: int, P: int, H: int, d: int, dtype: torch.dtype, device: str,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [B, c, H, d]`` and ``k, v [B, P + c, H, d]`` (a cache of ``P``, then the chunk's
    own keys), standard normal from ``seed``: the frozen-chunk kernels' operands."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, d, generator=gen) for n in (c, P + c, P + c))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def kernel_dtypes(device: str) -> list[torch.dtype]:
    """The dtypes a Triton attention kernel is tested in: bf16 and fp16 on CUDA; fp32 and fp64
    on a CPU, where the interpreter's bf16/fp16 tile products are wrong (Triton 3.9)."""
    if device == "cpu":
        return [torch.float32, torch.float64]
    return [torch.bfloat16, torch.float16]


def assert_within(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Max-abs error at most ``tol`` times the reference's largest magnitude (at least 1)."""
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= tol * max(scale, 1.0), (err, scale)


# The training tests' corpus text (tests/test_train_*.py).
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ")


def prepared_corpus(tmp_path_factory: pytest.TempPathFactory, docs: int = 8, repeats: int = 30,
                    val_docs: int = 2) -> Path:
    """A byte-level prepared corpus: ``docs`` documents of ``TEXT`` repeated ``repeats + 3i``
    times (about 40 KB of train text at the defaults), the last ``val_docs`` for validation."""
    from tttlm.data import prepare

    src = tmp_path_factory.mktemp("text")
    for i in range(docs):
        (src / f"doc{i}.txt").write_text(f"Chapter {i}. " + TEXT * (repeats + 3 * i))
    out = tmp_path_factory.mktemp("prepared")
    prepare([src], out, "bytes", val_docs=val_docs, progress=False)
    return out
