"""lm-evaluation-harness from the command line: `tttlm eval harness` (our outputs, our error
lines) and `python -m tttlm.hf.lm_eval` (lm-eval's own command line with --model tttlm)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _helpers import tiny_model

BOS = 256
DOCS = ["the best of times", "the worst of times, the age of wisdom"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lm_eval")
    from tttlm.hf import save_tokenizer

    path = tmp_path_factory.mktemp("model")
    tiny_model(vocab_size=258, bos_token_id=BOS, eos_token_id=257).save_pretrained(path)
    save_tokenizer("bytes", path)
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local rolling-loglikelihood task (no dataset hub)."""
    path = tmp_path_factory.mktemp("tasks")
    data = path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (path / "tiny.yaml").write_text(
        "task: tttlm_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    return path


def expected_bits_per_byte(model_dir: Path) -> float:
    """lm-eval's bits_per_byte from the model type's own rolling log-likelihoods."""
    from tttlm.hf.harness import TTTLMHarness

    lm = TTTLMHarness(pretrained=str(model_dir))
    logls = lm.loglikelihood_rolling([SimpleNamespace(args=(d,)) for d in DOCS])
    return -sum(logls) / sum(len(d.encode()) for d in DOCS) / math.log(2)


def test_harness_command_writes_json_csv_and_table(
        model_dir: Path, task_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tttlm.cli import main

    out = tmp_path / "out"
    assert main(["eval", "harness", "--model", str(model_dir), "--tasks", "tttlm_tiny",
                 "--include-path", str(task_dir), "--batch-size", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    results = json.loads((out / "harness.json").read_text())
    got = results["results"]["tttlm_tiny"]
    assert got["sample_len"] == len(DOCS)
    assert math.isclose(got["bits_per_byte,none"], expected_bits_per_byte(model_dir),
                        rel_tol=1e-12)
    with open(out / "harness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["task"], r["filter"], r["metric"]) for r in rows] == [
        ("tttlm_tiny", "none", "bits_per_byte")]
    assert float(rows[0]["value"]) == got["bits_per_byte,none"]
    # lm-eval's table, then the files written.
    row = next(line for line in stdout.splitlines() if line.startswith("|tttlm_tiny|"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[5] == "bits_per_byte"
    assert math.isclose(float(cells[7]), got["bits_per_byte,none"], abs_tol=1e-4)
    assert stdout.rstrip().splitlines()[-1] == (
        f"wrote {out / 'harness.json'}, {out / 'harness.csv'}")


def test_unknown_task_is_one_line(model_dir: Path, task_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tttlm.cli import main

    out = tmp_path / "out"
    assert main(["eval", "harness", "--model", str(model_dir), "--tasks", "tttlm_tinyy",
                 "--include-path", str(task_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tttlm eval harness: error: unknown lm-eval task "
                              "'tttlm_tinyy'; did you mean tttlm_tiny?")
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{model}", "--tasks", "x", "--model-args", "batch_size"],
     "--model-args 'batch_size' is not key=value"),
    (["--model", "{missing}", "--tasks", "x"], "model folder not found"),
    (["--model", "{model}", "--tasks", "x", "--lengths", "1k,zero"],
     "--lengths: 'zero' is not an integer"),
])
def test_bad_arguments_are_one_line(args: list[str], message: str, model_dir: Path,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tttlm.cli import main

    args = [a.format(model=model_dir, missing=tmp_path / "nope") for a in args]
    assert main(["eval", "harness", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tttlm eval harness: error: ")
    assert message in err[0]


def test_without_lm_eval_the_cli_still_works_and_says_what_to_install(tmp_path: Path) -> None:
    # Neither lm-eval nor transformers importable: the parser builds, and the command is
    # refused with the extra to install.
    code = ("import sys\n"
            "sys.modules['lm_eval'] = None\nsys.modules['transformers'] = None\n"
            "from tttlm.cli import main\n"
            f"sys.exit(main(['eval', 'harness', '--model', {str(tmp_path)!r}, "
            "'--tasks', 'niah_single_1']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "tttlm eval harness: error: lm-evaluation-harness is not installed; install it with "
        "pip install 'tttlm[eval]'")


def test_lm_eval_command_line_runs_model_tttlm(model_dir: Path, task_dir: Path,
                                               tmp_path: Path) -> None:
    """`python -m tttlm.hf.lm_eval` is lm-eval's own command line with `--model tttlm`: its
    options, its output files, our model's numbers."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "tttlm.hf.lm_eval", "--model", "tttlm",
         "--model_args", f"pretrained={model_dir}", "--tasks", "tttlm_tiny",
         "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|tttlm_tiny|" in result.stdout
    [path] = out.rglob("results_*.json")
    got = json.loads(path.read_text())["results"]["tttlm_tiny"]["bits_per_byte,none"]
    assert math.isclose(got, expected_bits_per_byte(model_dir), rel_tol=1e-12)


def test_lm_eval_defaults_beside_model_args(model_dir: Path) -> None:
    """lm-eval's command line passes --batch_size/--device (default cuda:0) beside the model
    args: a model arg wins; a GPU that is not there is a UserError naming the fix."""
    from tttlm.errors import UserError
    from tttlm.hf.harness import TTTLMHarness

    lm = TTTLMHarness.create_from_arg_obj({"pretrained": str(model_dir), "batch_size": 3},
                                          {"batch_size": 1, "device": "cpu",
                                           "max_batch_size": None})
    assert lm.batch_size == 3
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device=cuda:0 but .*use device=cpu"):
            TTTLMHarness.create_from_arg_obj({"pretrained": str(model_dir)},
                                             {"batch_size": 1, "device": "cuda:0"})
