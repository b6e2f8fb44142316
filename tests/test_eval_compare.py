"""``eval compare``: result files of separate runs merge into one Markdown report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tttlm.cli import main
from tttlm.config import TTTConfig
from tttlm.data.tokenizer import ByteTokenizer
from tttlm.eval import niah
from tttlm.eval.adapters import EvalError, TokenCorpus, tokenize_documents
from tttlm.eval.common import load_model
from tttlm.eval.compare import compare, merge_loss
from tttlm.eval.loss import evaluate_loss, write_loss_outputs
from tttlm.model import TTTForCausalLM


def save_tiny(path: Path, variant: str, seed: int) -> Path:
    torch.manual_seed(seed)
    config = TTTConfig(vocab_size=258, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, variant=variant, window=16, chunk_size=8,
                       bos_token_id=256, eos_token_id=257)
    TTTForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TTT-E2E run and a baseline evaluated separately, plus a NIAH result."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[256], rng.integers(0, 256, 59), [256], rng.integers(0, 256, 59)])
    corpus = TokenCorpus(tokens.astype(np.int64), np.array([0, 60]), 256, "random", "fp")
    out = {}
    for name, variant, seed in (("ttt", "e2e", 0), ("base", "full", 1)):
        em = load_model(save_tiny(root / name / "125m" / "final", variant, seed))
        # Two runs both named 125m (in other folders): compare must keep them apart.
        report = evaluate_loss([em], corpus, [16, 32] if name == "ttt" else [16, 24])
        write_loss_outputs(report, root / name, plots=False)
        out[name] = root / name
    tok = ByteTokenizer()
    hay = niah.build_haystack(tokenize_documents([("d", "Some text. More text.\n")], tok, "t"),
                              tok)
    settings = niah.NiahSettings(kinds=["passkey"], lengths=[420], depths=[0.0, 1.0],
                                 samples=2)
    records = niah.evaluate_niah("final", hay, tok, settings, lambda s: " " + s.value)
    report = niah.niah_report([{"label": "final", "path": "x", "variant": "e2e", "ttt": True}],
                              hay, settings, {"final": records})
    niah.write_niah_outputs(report, root / "niah", plots=False)
    out["niah"] = root / "niah"
    return out


def test_compare_merges_runs(results: dict[str, Path], tmp_path: Path) -> None:
    path = compare([results["ttt"], results["base"] / "loss.json", results["niah"]], tmp_path)
    text = path.read_text()
    merged = json.loads((tmp_path / "loss.json").read_text())
    assert [m["label"] for m in merged["models"]] == ["125m", "125m #2"]
    assert merged["lengths"] == [16, 24, 32]
    ttt = json.loads((results["ttt"] / "loss.json").read_text())["results"]["125m"]
    base = json.loads((results["base"] / "loss.json").read_text())["results"]["125m"]
    entry = merged["results"]["125m #2"]["16"]
    assert entry["diff_vs_first"] == pytest.approx(base["16"]["mean_nll"]
                                                   - ttt["16"]["mean_nll"])
    assert entry["diff_stderr"] is not None  # same data: paired over the same windows
    # A length one run did not evaluate stays empty instead of inventing numbers.
    assert merged["results"]["125m #2"]["32"]["mean_nll"] is None
    assert merged["results"]["125m"]["24"]["mean_nll"] is None
    assert "## Loss by context length" in text and "## Needle in a haystack" in text
    assert f"{ttt['16']['mean_nll']:.4f}" in text and "125m #2" in text
    for image in ("loss_vs_length.png", "loss_by_position.png", "niah_accuracy.png"):
        assert f"]({image})" in text and (tmp_path / image).stat().st_size > 0
    assert "| passkey" not in text and "1.00 /" in text


def test_merge_of_other_data_is_not_paired(results: dict[str, Path]) -> None:
    a = json.loads((results["ttt"] / "loss.json").read_text())
    b = json.loads((results["base"] / "loss.json").read_text())
    b["data"]["fingerprint"] = "other"
    a["_file"], b["_file"] = "a.json", "b.json"
    merged = merge_loss([a, b])
    assert merged["results"]["125m #2"]["16"]["diff_stderr"] is None
    assert "other data" in merged["notes"][0]


def test_compare_bad_input(results: dict[str, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"hello": 1}))
    assert main(["eval", "compare", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "not a tttlm evaluation result" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tttlm eval compare: error: ") and "no such file" in err
    with pytest.raises(EvalError, match="holds no loss.json or niah.json"):
        compare([tmp_path], tmp_path / "o")
    assert main(["eval", "compare", str(results["ttt"]), "--out", str(tmp_path / "ok"),
                 "--no-plots"]) == 0
    assert "![" not in (tmp_path / "ok" / "report.md").read_text()


def test_compare_names_old_final_labels_after_their_run(results: dict[str, Path],
                                                        tmp_path: Path) -> None:
    # Result files written before models were named after their run call each run's model
    # "final" (and "final #2", ...): compare shows them under their run's name.
    old = json.loads((results["ttt"] / "loss.json").read_text())
    old["models"][0].update(label="final #2", path="runs/e2e-125m/final")
    old["results"] = {"final #2": old["results"]["125m"]}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "loss.json").write_text(json.dumps(old))
    compare([tmp_path / "old", results["base"]], tmp_path / "o", plots=False)
    merged = json.loads((tmp_path / "o" / "loss.json").read_text())
    assert [m["label"] for m in merged["models"]] == ["e2e-125m", "125m"]
    assert merged["results"]["125m"]["16"]["diff_vs_first"] is not None


def test_reports_are_written_whole_with_the_umask(results: dict[str, Path],
                                                  tmp_path: Path) -> None:
    # Reports go through a temporary file renamed into place (never half-written), created
    # with the usual 0666 & ~umask (a temporary file from mkstemp would be 0600).
    old = os.umask(0o027)
    try:
        compare([results["ttt"], results["niah"]], tmp_path / "o")
    finally:
        os.umask(old)
    written = sorted((tmp_path / "o").iterdir())
    assert {p.name for p in written} >= {"report.md", "loss.json", "niah.json",
                                         "loss_vs_length.png"}
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in written), written
    assert not [p for p in written if p.name.startswith(".")]
