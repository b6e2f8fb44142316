"""The command line as a whole: fast to start (no torch before a command runs), lazy package
namespaces, and one error style for every command."""

from __future__ import annotations

import errno
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tttlm.cli import main
from tttlm.errors import UserError

PACKAGES = ["tttlm", "tttlm.bench", "tttlm.convert", "tttlm.data", "tttlm.eval",
            "tttlm.inference", "tttlm.model", "tttlm.train", "tttlm.ttt"]


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)


def test_parser_and_version_do_not_import_torch() -> None:
    # Before: `import tttlm` imported the model (and torch, 2+ s) and so did every
    # subcommand's module, only to build the parser.
    result = _python("import sys, tttlm, tttlm.cli\n"
                     "tttlm.cli.build_parser()\n"
                     "print(tttlm.__version__)\n"
                     "print(sorted(m for m in sys.modules if m == 'torch' or "
                     "m.startswith('torch.')))")
    assert result.returncode == 0, result.stderr
    version, loaded = result.stdout.splitlines()
    assert version and loaded == "[]"


def test_help_exits_at_once() -> None:
    started = time.perf_counter()
    result = _python("import sys; from tttlm.cli import main; sys.exit(main(['--help']))")
    print(f"tttlm --help: {time.perf_counter() - started:.2f} s")  # informative, not asserted
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tttlm") and "bench" in result.stdout


@pytest.mark.parametrize("package", PACKAGES)
def test_lazy_namespaces_keep_their_public_names(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
        assert name in dir(module)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_names_shared_with_their_module_stay_functions() -> None:
    # `tttlm.data.prepare` is both a module and the function it defines; importing the module
    # (as the data command does) must not turn `from tttlm.data import prepare` into it.
    import tttlm.data.prepare  # noqa: F401
    import tttlm.eval.compare  # noqa: F401
    from tttlm.data import prepare
    from tttlm.eval import compare

    assert callable(prepare) and callable(compare)
    from tttlm import GradMode, TTTConfig, TTTForCausalLM
    from tttlm.ttt.inner import GradMode as InnerGradMode

    assert InnerGradMode is GradMode and TTTConfig.__module__ == "tttlm.config"
    assert TTTForCausalLM.__name__ == "TTTForCausalLM"


# ------------------------------------------------------------------------------ error style
def _bad_inputs(tmp: Path) -> dict[str, list[str]]:
    """A command line per subcommand that a user can get wrong."""
    text = tmp / "doc.txt"
    text.write_text("a few words")
    return {
        "tttlm eval loss": ["eval", "loss", "--model", str(tmp / "no-model"), "--data",
                            str(text), "--lengths", "8,x", "--quiet"],
        "tttlm eval niah": ["eval", "niah", "--model", str(tmp / "no-model"), "--lengths", "64",
                            "--kinds", "essay", "--quiet"],
        "tttlm eval compare": ["eval", "compare", str(tmp / "missing.json")],
        "tttlm convert official": ["convert", "official", str(tmp / "missing"),
                                   str(tmp / "out")],
        "tttlm bench decode": ["bench", "decode", "--device", "cpu", "--presets", "tiny",
                               "--modes", "graph", "--out", str(tmp / "r")],
    }


@pytest.mark.parametrize("command", ["tttlm data prepare", "tttlm train", "tttlm generate"])
def test_every_command_reports_bad_input_alike(command: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = {"tttlm data prepare": ["data", "prepare", str(tmp_path / "missing.txt"), "--out",
                                   str(tmp_path / "data"), "--tokenizer", "bytes", "--quiet"],
            "tttlm train": ["train", "--preset", "debug", "--set", "lr=abc"],
            "tttlm generate": ["generate", "--model", str(tmp_path / "no-model"), "--prompt",
                               "x"]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{command}: error: "), err


@pytest.mark.parametrize("command", ["tttlm eval loss", "tttlm eval niah", "tttlm eval compare",
                                     "tttlm convert official", "tttlm bench decode"])
def test_bad_input_is_one_line_naming_the_command(command: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "tttlm: error: ..." (no command), "tttlm eval: error: ..." or
    # "tttlm train: ..." depending on the command.
    assert main(_bad_inputs(tmp_path)[command]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith(f"{command}: error: ") and "; " in last, err
    assert "Traceback" not in err
    assert all(line.startswith(f"{command}: ") for line in err.splitlines())


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _bad_inputs(tmp_path)["tttlm eval compare"]
    with pytest.raises(UserError, match="no such file"):
        main([*args, "--debug"])
    monkeypatch.setenv("TTTLM_DEBUG", "1")
    with pytest.raises(UserError):
        main(args)
    result = _python("import sys; from tttlm.cli import main; sys.exit(main(sys.argv[1:]))",
                     *args, "--debug")
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr


def _failing_compare(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise err

    monkeypatch.setattr(importlib.import_module("tttlm.eval.compare"), "compare", fail)


def test_unexpected_error_is_one_line_with_exit_1(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _failing_compare(monkeypatch, RuntimeError("boom\nsecond line"))
    assert main(["eval", "compare", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("tttlm eval compare: error: RuntimeError: boom second line; ")
    assert "--debug" in err


@pytest.mark.parametrize(("error", "expected"), [
    (OSError(errno.ENOSPC, "No space left on device", "out/report.md"),
     ["no space left on device", "out/report.md", "; free some space"]),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "out/report.md"),
     ["Is a directory: out/report.md; check the path"]),
])
def test_os_errors_are_user_errors(error: OSError, expected: list[str], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _failing_compare(monkeypatch, error)
    assert main(["eval", "compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm eval compare: error: ") and err.count("\n") == 1
    assert all(part in err for part in expected), err
