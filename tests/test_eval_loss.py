"""Loss by context length: the report equals the model's own token_nll, windows, resume, CLI."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tttlm.cli import main
from tttlm.config import TTTConfig
from tttlm.data.tokenizer import ByteTokenizer
from tttlm.eval import loss as loss_eval
from tttlm.eval.adapters import EvalError, TokenCorpus, tokenize_documents
from tttlm.eval.common import PARTIAL_FILE, load_model
from tttlm.eval.loss import WindowMode, evaluate_loss, max_length, plan_windows
from tttlm.model import TTTForCausalLM

BOS = 256


def save_tiny(path: Path, variant: str = "e2e", seed: int = 0) -> Path:
    """A 2-layer model on the byte vocabulary (BOS 256), window 16, chunk 8."""
    torch.manual_seed(seed)
    config = TTTConfig(vocab_size=258, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, variant=variant, window=16, chunk_size=8,
                       bos_token_id=256, eos_token_id=257)
    TTTForCausalLM(config).save_pretrained(path)
    return path


def random_corpus(lengths: list[int], seed: int = 0) -> TokenCorpus:
    """Documents of the given lengths (BOS included), random byte ids."""
    rng = np.random.default_rng(seed)
    parts = [np.concatenate([[BOS], rng.integers(0, 256, n - 1)]) for n in lengths]
    offsets = np.cumsum([0, *lengths[:-1]])
    return TokenCorpus(tokens=np.concatenate(parts).astype(np.int64), doc_offsets=offsets,
                       bos_id=BOS, source="random", fingerprint=f"random-{seed}")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"e2e": save_tiny(root / "e2e"), "swa": save_tiny(root / "swa", "swa", 1),
            "full": save_tiny(root / "full", "full", 2)}


def reference_nll(model: TTTForCausalLM, rows: np.ndarray, ttt: bool | None) -> tuple:
    """token_nll and mask of every window, one forward pass per window (batch 1)."""
    nll, mask = [], []
    for row in rows:
        ids = torch.from_numpy(row[None])
        labels = ids[:, 1:]
        with torch.inference_mode():
            out = model(ids[:, :-1], labels=labels, loss_mask=labels != BOS, ttt=ttt)
        nll.append(out.token_nll[0].double().numpy())
        mask.append((labels[0] != BOS).numpy())
    return np.stack(nll), np.stack(mask)


@pytest.mark.parametrize("mode", ["document", "stream"])
def test_report_matches_token_nll(models: dict[str, Path], tmp_path: Path, mode: str) -> None:
    # L=21 ends in a partial chunk; L=40 is longer than the window (16); batch 2 vs reference 1.
    corpus = random_corpus([50, 37, 90, 23])
    ems = [load_model(models["e2e"]), load_model(models["swa"]),
           load_model(models["e2e"], ttt=False)]
    lengths = [21, 40]
    report = evaluate_loss(ems, corpus, lengths, mode=mode, batch_size=2, curve_points=10_000,
                           out_dir=tmp_path)
    assert report["data"]["windows"] == mode
    assert report["data"]["loss_mask"] == loss_eval.LOSS_MASK_RULE
    for em in ems:
        for L in lengths:
            windows = plan_windows(corpus, L, mode)
            rows = np.stack([corpus.tokens[w.start:w.start + L + 1] for w in windows])
            nll, mask = reference_nll(em.model, rows, em.ttt)
            entry = report["results"][em.label][str(L)]
            assert entry["sequences"] == len(windows) > 0
            assert entry["tokens"] == mask.sum()
            # Tolerance: batch-2 vs batch-1 float32 forward passes.
            np.testing.assert_allclose(entry["mean_nll"], nll[mask].mean(), rtol=1e-5)
            per_position = np.where(mask, nll, 0).sum(0) / np.maximum(mask.sum(0), 1)
            curve = np.array([np.nan if v is None else v for v in entry["curve"]["mean_nll"]])
            assert entry["curve"]["bin"] == 1 and len(curve) == L
            np.testing.assert_allclose(curve[mask.sum(0) > 0], per_position[mask.sum(0) > 0],
                                       rtol=1e-5)
            assert np.isnan(curve[mask.sum(0) == 0]).all()
    first = report["results"][ems[0].label]
    for em in ems[1:]:
        mine = report["results"][em.label]
        for L in lengths:
            assert mine[str(L)]["diff_vs_first"] == pytest.approx(
                mine[str(L)]["mean_nll"] - first[str(L)]["mean_nll"])
    if mode == "stream":
        # Stream windows cross document boundaries: their BOS targets are not counted.
        assert any(entry["tokens"] < entry["sequences"] * L
                   for L, entry in ((L, report["results"][ems[0].label][str(L)])
                                    for L in lengths))


def test_binned_curve_is_the_mean_of_its_positions(models: dict[str, Path]) -> None:
    corpus = random_corpus([80, 80])
    em = load_model(models["full"])
    fine = evaluate_loss([em], corpus, [30], curve_points=100)["results"][em.label]["30"]
    coarse = evaluate_loss([em], corpus, [30], curve_points=4)["results"][em.label]["30"]
    assert coarse["curve"]["bin"] == 8 and coarse["curve"]["positions"] == [0, 8, 16, 24]
    nll = np.array(fine["curve"]["mean_nll"][:8], dtype=float)
    count = np.array(fine["curve"]["count"][:8])
    assert coarse["curve"]["mean_nll"][0] == pytest.approx((nll * count).sum() / count.sum())
    assert coarse["mean_nll"] == pytest.approx(fine["mean_nll"])


def test_windows_lie_in_one_document_and_interleave() -> None:
    corpus = random_corpus([25, 60, 11, 40])
    windows = plan_windows(corpus, 10, WindowMode.DOCUMENT)
    ends = corpus.doc_offsets + corpus.doc_lengths()
    for w in windows:
        assert corpus.doc_offsets[w.doc] <= w.start and w.start + 11 <= ends[w.doc]
    # (n - 1) // L windows per document; the first window of every document comes first.
    assert [w.doc for w in windows] == [0, 1, 2, 3, 0, 1, 3, 1, 3, 1, 1]
    assert [w.index for w in windows] == list(range(len(windows)))
    assert plan_windows(corpus, 10, "document", max_sequences=3) == windows[:3]
    stream = plan_windows(corpus, 10, WindowMode.STREAM)
    assert [w.start for w in stream] == list(range(0, 136 - 10, 10))
    thinned = plan_windows(corpus, 10, WindowMode.STREAM, max_sequences=3)
    assert [w.index for w in thinned] == [0, 6, 12]
    assert max_length(corpus, "document") == 59 and max_length(corpus, "stream") == 135


def test_length_beyond_the_data_names_the_maximum() -> None:
    corpus = random_corpus([25, 60])
    with pytest.raises(EvalError, match=r"largest possible length is 59.*stream allows up to 84"):
        plan_windows(corpus, 60, "document")
    with pytest.raises(EvalError, match="largest possible length is 84"):
        plan_windows(corpus, 85, "stream")
    assert len(plan_windows(corpus, 59, "document")) == 1


def test_data_from_another_tokenizer_is_refused(models: dict[str, Path]) -> None:
    em = load_model(models["full"])
    corpus = random_corpus([30])
    corpus.tokens[5] = 300
    with pytest.raises(EvalError, match="token id 300.*vocab_size 258"):
        evaluate_loss([em], corpus, [8])
    other_bos = random_corpus([30])
    other_bos.bos_id = 1
    with pytest.raises(EvalError, match="BOS id 1"):
        evaluate_loss([em], other_bos, [8])


def test_interrupted_run_resumes_without_recomputing(models: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = random_corpus([70, 70, 70])
    em = load_model(models["e2e"])
    expected = evaluate_loss([em], corpus, [16, 32])
    real = loss_eval.score_windows
    calls: list[int] = []

    def flaky(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_eval, "score_windows", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate_loss([em], corpus, [16, 32], out_dir=tmp_path)
    lines = (tmp_path / PARTIAL_FILE).read_text().splitlines()
    assert len(lines) == 2
    # A kill in the middle of a write leaves a cut line: it is skipped, not fatal.
    with open(tmp_path / PARTIAL_FILE, "a") as fh:
        fh.write(lines[0][: len(lines[0]) // 2])

    calls.clear()
    monkeypatch.setattr(loss_eval, "score_windows",
                        lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    resumed = evaluate_loss([em], corpus, [16, 32], out_dir=tmp_path)
    total = sum(len(plan_windows(corpus, L, "document")) for L in (16, 32))
    assert sum(calls) == total - 2
    for L in ("16", "32"):
        mine, ref = resumed["results"][em.label][L], expected["results"][em.label][L]
        assert mine["mean_nll"] == pytest.approx(ref["mean_nll"], rel=1e-6)
        assert mine["sequences"] == ref["sequences"]
    calls.clear()
    evaluate_loss([em], corpus, [16, 32], out_dir=tmp_path)
    assert calls == []


def test_outputs_and_missing_matplotlib(models: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = random_corpus([60, 60])
    ems = [load_model(models["e2e"]), load_model(models["swa"])]
    report = evaluate_loss(ems, corpus, [16, 40])
    # The PNGs are checked in test_eval_compare (drawing them is the slow part).
    written = loss_eval.write_loss_outputs(report, tmp_path / "with", plots=False)
    assert {p.name for p in written} == {"loss.json", "loss_table.csv", "loss_curves.csv"}
    assert all(p.stat().st_size > 0 for p in written)
    with open(tmp_path / "with" / "loss_table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["model"], r["length"]) for r in rows] == [("e2e", "16"), ("e2e", "40"),
                                                         ("swa", "16"), ("swa", "40")]
    assert float(rows[1]["mean_nll"]) == pytest.approx(report["results"]["e2e"]["40"]["mean_nll"])
    assert json.loads((tmp_path / "with" / "loss.json").read_text())["lengths"] == [16, 40]
    table = loss_eval.format_table(report)
    assert "e2e" in table and "swa" in table and ("(+" in table or "(-" in table)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    from tttlm.eval import common

    monkeypatch.setattr(common, "_warned", set())
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        written = loss_eval.write_loss_outputs(report, tmp_path / "without")
    assert {p.name for p in written} == {"loss.json", "loss_table.csv", "loss_curves.csv"}


def test_cli_loss_on_text_and_prepared_data(models: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tttlm.data import prepare

    text = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "tea", "cup"]
    docs = [" ".join(rng.choice(words, 30)) for _ in range(3)]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    rc = main(["eval", "loss", "--model", str(models["e2e"]), "--model", str(models["full"]),
               "--data", str(text), "--tokenizer", "bytes", "--lengths", "24,48",
               "--max-sequences", "3", "--out", str(out), "--quiet", "--no-plots"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "e2e" in printed and "full" in printed and "sequences per length" in printed
    report = json.loads((out / "loss.json").read_text())
    assert report["results"]["e2e"]["48"]["sequences"] == 3

    # The same documents prepared with the same tokenizer give the same numbers, also with
    # compiled blocks.
    prepared = tmp_path / "prepared"
    prepare([text], prepared, "bytes", progress=False)
    corpus = tokenize_documents([("d", d) for d in docs], ByteTokenizer(), "x")
    out2 = tmp_path / "out2"
    with pytest.warns(UserWarning, match="no val split"):
        rc = main(["eval", "loss", "--model", str(models["e2e"]), "--data", str(prepared),
                   "--lengths", "24,48", "--max-sequences", "3", "--out", str(out2),
                   "--quiet", "--no-plots", "--compile"])
    assert rc == 0
    again = json.loads((out2 / "loss.json").read_text())
    assert again["data"]["tokens"] == corpus.num_tokens
    assert again["results"]["e2e"]["48"]["mean_nll"] == pytest.approx(
        report["results"]["e2e"]["48"]["mean_nll"], rel=1e-5)


def test_cli_bad_input(models: dict[str, Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "doc.txt"
    text.write_text("short text " * 5)
    base = ["eval", "loss", "--data", str(text), "--tokenizer", "bytes", "--out",
            str(tmp_path / "o"), "--quiet"]
    assert main([*base, "--model", str(models["full"]), "--lengths", "500"]) == 2
    assert "largest possible length is 55" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path), "--lengths", "8"]) == 2
    assert "is not a tttlm model directory" in capsys.readouterr().err
    assert main([*base, "--model", str(models["full"]), "--lengths", "8,x"]) == 2
    err = capsys.readouterr().err
    assert err == ("tttlm eval loss: error: --lengths: 'x' is not an integer; give integers "
                   "such as 1024 or 8k\n")
    no_tok = ["eval", "loss", "--data", str(text), "--model", str(models["full"]),
              "--lengths", "8", "--quiet"]
    assert main(no_tok) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--model", str(models["full"]), "--lengths", "8", "--device",
                     "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_models_are_named_after_their_run(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Before: every run's model folder is `final/`, so models were shown as "final",
    # "final #2", ... Now: the run's name, the run and step of a checkpoint, else the folder.
    runs = tmp_path / "runs"
    final = save_tiny(runs / "125m-e2e" / "final")
    checkpoint = save_tiny(runs / "125m-e2e" / "checkpoints" / "step_00000200")
    baseline = save_tiny(runs / "125m-full" / "final", "full", 2)
    other = save_tiny(tmp_path / "elsewhere" / "125m-full" / "final", "full", 3)
    text = tmp_path / "doc.txt"
    text.write_text("some words to read " * 10)
    out = tmp_path / "out"
    assert main(["eval", "loss", "--model", str(final), "--model", str(checkpoint),
                 "--model", str(baseline), "--model", str(other), "--data", str(text),
                 "--tokenizer", "bytes", "--lengths", "24", "--max-sequences", "1",
                 "--out", str(out), "--quiet", "--no-plots"]) == 0
    report = json.loads((out / "loss.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert labels == ["125m-e2e", "125m-e2e step 200", "125m-full", "125m-full #2"]
    assert "125m-e2e step 200" in capsys.readouterr().out
    assert load_model(other, label="mine").label == "mine"


def test_progress_in_a_log_is_plain_lines(models: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # stderr captured here is not a terminal (like a log file or CI): no '\r' frames of a bar.
    em = load_model(models["full"])
    evaluate_loss([em], random_corpus([40, 40]), [16], progress=True)
    err = capsys.readouterr().err
    assert err.startswith("eval loss") and "\r" not in err
    assert all(line.startswith("eval loss") for line in err.splitlines()), err


def test_cli_ttt_group_learns_on_n_sequences_at_a_time_with_the_same_loss(
        models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(1)
    text.write_text("".join(json.dumps({"text": " ".join(rng.choice(["tea", "cup", "a"], 30))})
                            + "\n" for _ in range(4)))
    batches: list[int] = []
    build = TTTForCausalLM.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        build(self, *args, **kwargs)
        def spied(step):  # type: ignore[no-untyped-def]
            def spy(loss, *a, **k):  # type: ignore[no-untyped-def]
                batches.append(loss.shape[0])
                return step(loss, *a, **k)
            return spy

        for name in ("step", "step_"):  # new weights, or written in place
            setattr(self.inner_optimizer, name, spied(getattr(self.inner_optimizer, name)))

    monkeypatch.setattr(TTTForCausalLM, "__init__", init)
    reports = {}
    for group in ("all", "1"):
        batches.clear()
        out = tmp_path / f"out-{group}"
        assert main(["eval", "loss", "--model", str(models["e2e"]), "--data", str(text),
                     "--tokenizer", "bytes", "--lengths", "48", "--max-sequences", "4",
                     "--batch-size", "4", "--ttt-group", group, "--out", str(out), "--quiet",
                     "--no-plots"]) == 0
        reports[group] = json.loads((out / "loss.json").read_text())["results"]["e2e"]["48"]
        assert batches and max(batches) == (4 if group == "all" else 1)
    assert reports["1"]["sequences"] == reports["all"]["sequences"] == 4
    assert reports["1"]["mean_nll"] == pytest.approx(reports["all"]["mean_nll"], rel=1e-6)


def test_cli_refuses_a_bad_ttt_group(models: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "loss", "--model", str(models["e2e"]), "--lengths", "8", "--data", "x",
              "--ttt-group", "0"])
    assert exit_info.value.code == 2
    assert "tttlm eval loss: error: argument --ttt-group: '0' is not a number" in (
        capsys.readouterr().err)
