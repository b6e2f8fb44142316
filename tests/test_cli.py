"""The command line as a whole: fast to start (no torch before a command runs), lazy package
namespaces, and one error style for every command."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

import pytest

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
