"""``tttlm eval repeat``: the sequences put the same passage at the stated distance, the scores
are the model's own NLL at the scored positions (forward and token-by-token engine path agree),
retrieval quotes the first reading back before the second, and the command writes its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import memory_windows
from tttlm.cli import main
from tttlm.config import TTTConfig
from tttlm.eval.adapters import EvalError, TokenCorpus
from tttlm.eval.common import load_model
from tttlm.eval.repeat import RepeatSettings, build_items, evaluate_repeat, score_item
from tttlm.inference import Engine
from tttlm.memory import RecallSession
from tttlm.model import TTTForCausalLM

BOS = 256


def save_tiny(path: Path, variant: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = TTTConfig(vocab_size=258, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, variant=variant, window=16, chunk_size=8,
                       bos_token_id=BOS, eos_token_id=257)
    return TTTForCausalLM(config).save_pretrained(path)


def corpus(n: int = 3000, seed: int = 0) -> TokenCorpus:
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([[BOS], rng.integers(0, 256, n - 1)]).astype(np.int64)
    return TokenCorpus(tokens=tokens, doc_offsets=np.array([0]), bos_id=BOS, source="random",
                       fingerprint="r")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {v: save_tiny(root / v, v, i) for i, v in enumerate(("e2e", "swa", "full"))}


def test_items_repeat_the_passage_at_the_distance() -> None:
    settings = RepeatSettings(distances=[40], passage_len=16, cue=4, lead=10, samples=3)
    items = build_items(corpus(), settings, 40)
    assert len(items) == 3 and items[0].tokens != items[1].tokens
    for it in items:
        assert it.tokens[0] == BOS and it.first == 11
        assert it.second - (it.first + 16) == 40
        assert it.tokens[it.first:it.first + 16] == it.tokens[it.second:it.second + 16]
        assert len(it.tokens) == it.second + 16
    assert [it.tokens for it in build_items(corpus(), settings, 40)] == [it.tokens
                                                                          for it in items]


def test_scores_are_the_forwards_nll_and_the_engine_path_agrees(models: dict[str, Path]) -> None:
    em = load_model(models["e2e"])
    em.model.double()
    settings = RepeatSettings(distances=[24], passage_len=16, cue=4, lead=8, samples=1)
    item = build_items(corpus(), settings, 24)[0]
    first, second = score_item(em, item, settings, "off", torch.device("cpu"))
    ids = torch.tensor([item.tokens])
    with torch.no_grad():
        nll = em.model(ids[:, :-1], labels=ids[:, 1:]).token_nll[0].numpy()
    # token t's NLL sits at index t - 1 of the forward's output
    assert first == pytest.approx(nll[item.first + 3:item.first + 15].mean(), rel=1e-12)
    assert second == pytest.approx(nll[item.second + 3:item.second + 15].mean(), rel=1e-12)
    # Token by token through the engine (what --rag end uses) gives the same numbers.
    session = RecallSession(Engine(em.model), "off")
    session.read(item.tokens[:item.second])
    by_engine = session.score(item.tokens[item.second:item.second + 4],
                              item.tokens[item.second + 4:item.second + 16])
    assert np.mean(by_engine) == pytest.approx(second, rel=1e-9)


def test_retrieval_quotes_the_first_reading_back(models: dict[str, Path]) -> None:
    em = load_model(models["swa"])
    settings = RepeatSettings(distances=[128], passage_len=16, cue=8, lead=8, samples=2,
                              rag=["off", "end"])
    report = evaluate_repeat([em], corpus(), settings, device=torch.device("cpu"),
                             progress=False)
    assert set(report["results"]) == {"swa", "swa + retrieval"}
    off, end = report["results"]["swa"]["128"], report["results"]["swa + retrieval"]["128"]
    assert off["samples"] == end["samples"] == 2
    assert off["first"] == pytest.approx(end["first"], abs=0.5)  # nothing to recall yet
    # What the recall quoted before the second reading holds the passage's cue.
    item = build_items(corpus(), settings, 128)[0]
    session = RecallSession(Engine(em.model), "end", query_len=8)
    session.read(item.tokens[:item.second])
    session.score(item.tokens[item.second:item.second + 8], item.tokens[item.second + 8:][:8])
    L = session.memory.passage_len
    assert session.last_recall and all(
        item.first - L < p.start < item.first + 8 for p in session.last_recall)


def test_the_horizon_reaches_the_memory_and_the_report(models: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    em = load_model(models["swa"])
    windows = memory_windows(monkeypatch)
    for horizon, window in ((None, 16), (8, 8)):
        windows.clear()
        settings = RepeatSettings(distances=[4], passage_len=16, cue=8, lead=8, samples=1,
                                  rag=["end"], horizon=horizon)
        report = evaluate_repeat([em], corpus(), settings, device=torch.device("cpu"),
                                 progress=False)
        assert report["settings"]["horizon"] == horizon and set(windows) == {window}
    with pytest.raises(EvalError, match="add end to --rag"):
        RepeatSettings(distances=[4], rag=["off"], horizon=8).check()


def test_full_attention_runs_without_retrieval_only(models: dict[str, Path]) -> None:
    em = load_model(models["full"])
    with pytest.raises(EvalError, match="full attention"):
        evaluate_repeat([em], corpus(), RepeatSettings(distances=[8], rag=["end"]),
                        device=torch.device("cpu"), progress=False)
    report = evaluate_repeat([em], corpus(), RepeatSettings(distances=[8], samples=1,
                                                            rag=["off", "end"]),
                             device=torch.device("cpu"), progress=False)
    assert list(report["results"]) == ["full"] and "skipped" in report["notes"][0]


def test_cli_writes_json_csv_and_table(models: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "held_out.txt"
    rng = np.random.default_rng(1)
    text.write_text(" ".join(rng.choice(["tea", "cup", "alpha", "beta", "river"], 600)))
    out = tmp_path / "out"
    rc = main(["eval", "repeat", "--model", str(models["e2e"]), "--model",
               str(models["full"]), "--data", str(text), "--tokenizer", "bytes",
               "--distances", "8,64", "--passage-len", "16", "--cue", "4", "--samples", "2",
               "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| e2e |" in printed and "d=64" in printed
    report = json.loads((out / "repeat.json").read_text())
    assert set(report["results"]) == {"e2e", "full"}
    assert (out / "repeat.csv").read_text().count("\n") == 1 + 2 * 2
    assert (out / "repeat.png").is_file()
    rc = main(["eval", "repeat", "--model", str(models["e2e"]), "--data", str(text),
               "--tokenizer", "bytes", "--cue", "0", "--out", str(out), "--quiet"])
    assert rc == 2
    assert "error: cue=0" in capsys.readouterr().err
