"""``benchmarks/finetune_experiment.py`` end to end on a tiny random Llama (what the GPU run does
with SmolLM2-135M): convert (a), (b) and the e2e conversion, prepare the books, train (c) and
(d), evaluate, report; a rerun skips what is done, other settings in the same folder are
refused."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "finetune_experiment.py"
pytestmark = pytest.mark.slow


def experiment_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("finetune_experiment", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def random_llama(folder: Path) -> Path:
    import torch

    from tttlm.hf.tokenizer import byte_level_spec

    config = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    rust = tokenizers.Tokenizer.from_str(json.dumps(byte_level_spec()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<|bos|>",
                                         eos_token="<|eos|>").save_pretrained(folder)
    return folder


def test_the_experiment_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    module = experiment_module()
    source = random_llama(tmp_path / "random-llama")
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--source", str(source), "--work", str(work), "--window", "16", "--chunk", "8",
            "--seq-len", "64", "--steps", "2", "--batch-size", "1", "--eval-sequences", "2",
            "--device", "cpu", "--niah", "256", "--niah-kinds", "passkey", "--niah-depths",
            "0.5", "--niah-samples", "1", "--out", str(out), "--name", "exp"]
    assert module.main(args) == 0
    report = json.loads((out / "exp.json").read_text())
    rows = report["results"]
    assert list(rows) == [module.LABELS[k] for k in "abcd"]
    a, b = rows[module.LABELS["a"]], rows[module.LABELS["b"]]
    # Inside the window the sliding-window conversion sees what the original sees.
    assert b["inside_window"] == pytest.approx(a["inside_window"], abs=1e-4)
    for row in rows.values():
        assert row["sequences"] == 2 and row["past_window"] is not None
    paired = report["verdict"]["paired_c_minus_d"]
    assert paired["sequences"] == 2 and paired["stderr"] is not None
    assert {"convert", "data", "train_c", "train_d", "eval", "niah_off", "niah_end"} <= set(
        report["seconds"])
    niah = report["niah"]["results"]  # (a)-(d), then (b)-(d) with retrieval
    assert len(niah) == 7 and sum("retrieval" in label for label in niah) == 3
    for row in niah.values():
        assert len(row["accuracy"]) == 1 and 0 <= row["accuracy"][0] <= 1
        assert row["logprob_per_token"][0] < 0
    md = (out / "exp.md").read_text()
    assert "random-llama" in md and "(c) − (d)" in md and "Needle in a haystack" in md
    for written in ("exp.md", "exp.json", "exp_loss.json"):
        assert str(tmp_path) not in (out / written).read_text(), written
    assert (out / "exp.png").is_file()
    # A rerun reuses every step, evaluations included: nothing runs again.
    before = json.loads((work / "seconds.json").read_text())
    assert module.main(args) == 0
    assert json.loads((work / "seconds.json").read_text()) == before
    assert json.loads((out / "exp.json").read_text())["results"] == rows
    # The report again from a copy of the work folder (as fetched from the machine that ran
    # it), with remarks; what the copy lacks is listed as missing.
    copied = tmp_path / "elsewhere" / "work"
    shutil.copytree(work, copied)
    shutil.rmtree(copied / "niah-end")
    shutil.rmtree(copied / "niah-off")
    again = tmp_path / "again"
    only = ["--report-only", *args[:args.index("--work")], "--work", str(copied),
            *args[args.index("--work") + 2:args.index("--out")], "--out", str(again),
            "--name", "exp", "--remark", "ran in two calls"]
    assert module.main(only) == 0
    redone = json.loads((again / "exp.json").read_text())
    assert redone["results"] == rows and redone["by_window"] == report["by_window"]
    assert redone["remarks"] == ["ran in two calls"] and redone["niah"] is None
    # The command says how to reproduce the experiment, not how its report was written.
    assert redone["command"] == report["command"].replace("--out out", "--out again")
    assert any("not complete" in m for m in redone["missing"])
    assert "## How this run went" in (again / "exp.md").read_text()
    for written in ("exp.md", "exp.json", "exp_loss.json"):
        assert str(tmp_path) not in (again / written).read_text(), written
    # A cut NIAH run: the complete report of one, the records the other left (partial.jsonl).
    shutil.copytree(work / "niah-off", copied / "niah-off")
    (copied / "niah-end").mkdir()
    first = (work / "niah-end" / "partial.jsonl").read_text().splitlines()[0]
    (copied / "niah-end" / "partial.jsonl").write_text(first + "\n")
    assert module.main(only) == 0
    partial = json.loads((again / "exp.json").read_text())["niah"]
    assert partial["expected_per_length"] == 1
    for label in [module.LABELS[k] for k in "abcd"]:  # (a)-(d) as in the whole run
        assert partial["results"][label] == {**niah[label], "samples": [1]}
    scored = json.loads(first)["model"]
    assert partial["results"][scored] == {**niah[scored], "samples": [1]}
    assert len(partial["results"]) == 5  # the other two retrieval rows were never scored
    missing = json.loads((again / "exp.json").read_text())["missing"]
    unscored = [module.LABELS[k] + " + retrieval" for k in "bcd"]
    unscored.remove(scored)
    assert [m for m in missing if m.startswith("NIAH")] == [
        f"NIAH of {label} at 256 (0 of 1 samples)" for label in unscored]
    table = (again / "exp.md").read_text()
    assert f"| {scored} | " in table and "| — |" not in table.split(scored)[1].split("\n")[0]
    # A latency report of recall_latency.py goes into the report, a wrong file is refused.
    latency = tmp_path / "recall_latency_x.json"
    latency.write_text(json.dumps({"env": {"device": "cpu", "torch": "t", "command": "c"},
                                   "notes": ["n"], "rows": [
                                       {"model": "m", "context": 64, "rag": "end",
                                        "ms_per_new_token": 1.5, "ratio_vs_full": 0.5}]}))
    assert module.main([*only, "--latency", str(latency)]) == 0
    with_latency = json.loads((again / "exp.json").read_text())
    assert with_latency["latency"][0]["rows"][0]["ms_per_new_token"] == 1.5
    assert with_latency["latency"][0]["file"] == "recall_latency_x.json"
    assert not any("decode latency" in m for m in with_latency["missing"])
    assert "--latency" not in with_latency["command"]
    assert "| m | 64 | end | 1.5 |" in (again / "exp.md").read_text()
    latency.write_text("{}")
    with pytest.raises(SystemExit, match="not a recall_latency.py report"):
        module.main([*only, "--latency", str(latency)])
    (copied / "eval-loss" / "loss.json").unlink()
    with pytest.raises(SystemExit, match="loss.json does not exist"):
        module.main(only)
    with pytest.raises(SystemExit, match="other settings"):
        module.main([*args[:-2], "--steps", "3", "--name", "exp"])
    # Another recall horizon is measured into its own folder, not read from the first run's.
    assert module.main([*args, "--rag-horizon", "8"]) == 0
    horizon = json.loads((out / "exp.json").read_text())
    assert (work / "niah-end-horizon8" / "niah.json").is_file()
    assert horizon["niah"]["horizon"] == 8 and "--rag-horizon 8" in horizon["command"]
    assert horizon["results"] == rows and "at least 8 tokens old" in (out / "exp.md").read_text()


def test_report_helpers_name_no_folder_of_any_machine(tmp_path: Path) -> None:
    module = experiment_module()
    work = tmp_path / "smol-exp"
    roots = {work: ""}
    assert module.relative_paths({"m": [str(work / "runs" / "c")]}, roots) == {"m": ["runs/c"]}
    # The same work folder on the machine that ran it, and a path outside any work folder.
    assert module.relative_paths("/elsewhere/smol-exp/smol-full", roots) == "smol-full"
    assert module.relative_paths("/opt/models/x.gguf", roots) == "x.gguf"
    assert module.relative_paths("relative/kept", roots) == "relative/kept"
    assert module.strip_options(["--a", "1", "--remark", "r", "--remark=s", "--b"],
                                ("--remark",)) == ["--a", "1", "--b"]
