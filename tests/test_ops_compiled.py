"""compile_or_fall_back: where torch.compile fails, the function runs uncompiled from then
on, with one warning, and gives its own values; where it works, the compiled form runs.
inductor_compile: Inductor's coordinate-descent tuning unless the user set Inductor's own
switch."""

from __future__ import annotations

import warnings

import pytest
import torch

from tttlm.ops.compiled import TUNING_ENV, compile_or_fall_back, inductor_compile, inductor_options


def _counted() -> tuple[list[int], object]:
    calls: list[int] = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 2 * x

    return calls, double


def test_a_compiler_failure_falls_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: object, dynamic: object = None, options: object = None) -> object:
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

    def fake_compile(fn, dynamic=None, options=None):  # noqa: ANN001, ANN202  (its shape)
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


def test_inductor_tunes_unless_the_user_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TUNING_ENV, raising=False)
    assert inductor_options() == {"coordinate_descent_tuning": True}
    for value in ("0", "1"):  # the user's setting, either way, is Inductor's to read
        monkeypatch.setenv(TUNING_ENV, value)
        assert inductor_options() is None


def test_inductor_compile_passes_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_compile(fn, dynamic=None, options=None):  # noqa: ANN001, ANN202
        seen.append((dynamic, options))
        return fn

    monkeypatch.delenv(TUNING_ENV, raising=False)
    monkeypatch.setattr(torch, "compile", fake_compile)
    inductor_compile(torch.sin, dynamic=True)
    compile_or_fall_back(torch.cos)
    assert seen == [(True, {"coordinate_descent_tuning": True}),
                    (None, {"coordinate_descent_tuning": True})]


def test_this_torch_takes_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.compile rejects an option its Inductor does not know: the real call, on a CPU.
    monkeypatch.delenv(TUNING_ENV, raising=False)
    fn = inductor_compile(lambda x: (x * x).sum(-1), dynamic=False)
    x = torch.randn(4, 8)
    torch.testing.assert_close(fn(x), (x * x).sum(-1))
