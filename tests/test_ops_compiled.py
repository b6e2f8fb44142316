"""compile_or_fall_back: where torch.compile fails, the function runs uncompiled from then
on, with one warning, and gives its own values; where it works, the compiled form runs."""

from __future__ import annotations

import warnings

import pytest
import torch

from tttlm.ops.compiled import compile_or_fall_back


def _counted() -> tuple[list[int], object]:
    calls: list[int] = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 2 * x

    return calls, double


def test_a_compiler_failure_falls_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: object, dynamic: object = None) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    calls, double = _counted()
    run = compile_or_fall_back(double)  # type: ignore[arg-type]
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="double: torch.compile failed .*no compiler"):
        assert torch.equal(run(x), 2 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second try
        assert torch.equal(run(x), 2 * x)
    assert len(calls) == 2


def test_the_compiled_form_runs_where_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled_calls = []

    def fake_compile(fn, dynamic=None):  # noqa: ANN001, ANN202  (torch.compile's shape)
        def run(*args):  # noqa: ANN002, ANN202
            compiled_calls.append(dynamic)
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    calls, double = _counted()
    run = compile_or_fall_back(double, dynamic=None)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(run(torch.ones(2)), torch.full((2,), 2.0))
    assert compiled_calls == [None] and len(calls) == 1
