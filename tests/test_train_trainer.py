"""Trainer: schedule, bit-identical resume, Ctrl-C checkpoint, context extension, the CLI."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import TEXT, prepared_corpus
from tttlm.data import prepare
from tttlm.model.model import TTTForCausalLM
from tttlm.train import checkpoint as ckpt
from tttlm.train.config import TrainConfig
from tttlm.train.trainer import Trainer, WarmupCosine


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level prepared corpus: ~40 KB of train text and two val documents."""
    return prepared_corpus(tmp_path_factory)


def tiny_config(data_dir: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        model="tiny", mode="e2e", data=str(data_dir), out_dir=str(out), seq_len=64,
        batch_size=4, micro_batch_size=2, steps=6, lr=3e-3, log_every=1, eval_every=3,
        eval_sequences=2, save_every=2, keep_checkpoints=2, progress=False,
        tensorboard=False, model_overrides={"window": 32, "chunk_size": 16})
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_warmup_cosine_schedule() -> None:
    rule = WarmupCosine(steps=100, warmup=10, end_ratio=0.01)
    assert rule(0) == pytest.approx(0.1)
    assert rule(9) == pytest.approx(1.0)
    assert rule(10) == pytest.approx(1.0)
    assert rule(99) == pytest.approx(0.01)
    values = [rule(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("mode", ["e2e", "full"])
def test_resume_is_bit_identical(data_dir: Path, tmp_path: Path, mode: str) -> None:
    """Train 6 steps == train 3, stop, resume 3: same losses and parameters, bit for bit."""
    straight = Trainer(tiny_config(data_dir, tmp_path / "a", mode=mode))
    straight.train()

    first = Trainer(tiny_config(data_dir, tmp_path / "b", mode=mode))
    summary = first.train(until=3)
    assert summary["step"] == 3 and ckpt.latest_checkpoint(tmp_path / "b").name.endswith("3")
    # Scramble every RNG so that resume must restore them, not inherit them.
    torch.manual_seed(1234)
    resumed = Trainer(tiny_config(data_dir, tmp_path / "b", mode=mode), resume=True)
    assert resumed.step == 3
    resumed.train()

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for (name, a), (_, b) in zip(straight.module.state_dict().items(),
                                 resumed.module.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # Only the newest `keep_checkpoints` survive, and the final model loads.
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [4, 6]
    final = TTTForCausalLM.from_pretrained(tmp_path / "b" / "final")
    assert torch.equal(final.embed.weight, resumed.module.embed.weight)


def test_metrics_and_resolved_config_are_written(data_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(data_dir, tmp_path, steps=3, eval_every=0))
    summary = trainer.train()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr", "inner_lr", "tokens_per_s", "inner_update_norm"):
        assert all(isinstance(r[key], float) and r[key] >= 0 for r in records), key
    # Inner-LR warmup over 10% of 3 steps rounds to 0 steps: η = 1 from the start.
    assert records[0]["inner_lr"] == 1.0
    assert "eval_loss" in records[-1] and summary["eval_loss"] == records[-1]["eval_loss"]
    saved = TrainConfig.from_dict(json.loads((tmp_path / "train_config.json").read_text()))
    assert saved == trainer.config
    # The data's vocabulary (bytes: 258 ids, BOS 256) replaced the preset's.
    assert trainer.model_config.vocab_size == 258 and trainer.model_config.bos_token_id == 256


def test_no_ttt_and_inner_lr_warmup(data_dir: Path, tmp_path: Path) -> None:
    no_ttt = Trainer(tiny_config(data_dir, tmp_path / "a", ttt=False, steps=1))
    rec = no_ttt.train_step()
    assert rec["inner_lr"] is None and "inner_update_norm" not in rec
    warm = Trainer(tiny_config(data_dir, tmp_path / "b", steps=10, inner_lr_warmup_frac=0.5))
    etas = [warm.train_step()["inner_lr"] for _ in range(6)]
    assert etas == pytest.approx([0.1 + 0.9 * min(1, (s + 1) / 5) for s in range(6)])


def test_ctrl_c_saves_a_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(data_dir, tmp_path, steps=50, save_every=0))
    original = trainer.train_step

    def step_then_interrupt() -> dict[str, object]:
        record = original()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    trainer.train_step = step_then_interrupt  # type: ignore[method-assign]
    summary = trainer.train()
    assert summary["interrupted"] and summary["step"] == 2
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_context_extension_loads_weights_only(data_dir: Path, tmp_path: Path) -> None:
    short = Trainer(tiny_config(data_dir, tmp_path / "short", steps=2, seq_len=32))
    short.train()
    long = Trainer(tiny_config(data_dir, tmp_path / "long", steps=2, seq_len=128, lr=4e-4,
                               init_from=str(tmp_path / "short"), inner_lr_warmup_frac=0.0,
                               model="no-such-preset-needed"))
    # Weights equal the source run's final model; optimizer and schedule start fresh.
    source = load_file(str(tmp_path / "short" / "final" / "model.safetensors"))
    for name, value in long.module.state_dict().items():
        assert torch.equal(value, source[name]), name
    assert long.step == 0 and not long.optimizer.state
    assert long.model_config.inner_lr_at(0) == 1.0  # η fixed at 1: no warmup
    assert long.model_config.window == 32 and long.train_data.seq_len == 128
    long.train()
    assert long.step == 2


def test_init_from_rejects_a_mismatched_mode(data_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(data_dir, tmp_path / "full", mode="full", steps=1)).train()
    with pytest.raises(ValueError, match="mode"):
        Trainer(tiny_config(data_dir, tmp_path / "x", mode="e2e",
                            init_from=str(tmp_path / "full")))


def test_bad_inputs(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training data"):
        Trainer(tiny_config(data_dir, tmp_path, data=""))
    with pytest.raises(ValueError, match="too few"):
        Trainer(tiny_config(data_dir, tmp_path, seq_len=10**7))
    with pytest.raises(ValueError, match="vocab"):
        Trainer(tiny_config(data_dir, tmp_path, model_overrides={"vocab_size": 100}))
    with pytest.raises(FileNotFoundError, match="holds no model"):
        Trainer(tiny_config(data_dir, tmp_path, init_from=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="neither"):
        Trainer(tiny_config(data_dir, tmp_path), resume=str(tmp_path / "nothing"))


def test_cli_train_and_resume(data_dir: Path, tmp_path: Path) -> None:
    from tttlm.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "debug", "--data", str(data_dir), "--out", str(out),
            "--steps", "4", "--seq-len", "64", "--set", "model.window=32",
            "--set", "model.chunk_size=16", "--set", "progress=false", "--set", "eval_every=0",
            "--set", "tensorboard=false", "--set", "log_every=1", "--stop-at", "2"]
    assert main(args) == 0
    assert ckpt.latest_checkpoint(out).name == "step_00000002"
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["model_overrides"] == {"window": 32, "chunk_size": 16}
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").is_file()
    assert main(["train", "--preset", "debug", "--set", "lr=abc"]) == 2
    assert main(["train", "--preset", "debug", "--data", str(tmp_path / "none")]) == 2


def test_model_folders_carry_the_tokenizer(tmp_path: Path) -> None:
    """A trained model folder is enough to decode text: the data's tokenizer sits beside it."""
    from tttlm.data import load_tokenizer, resolve_tokenizer

    src = tmp_path / "text"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"Chapter {i}. " + TEXT * 20)
    data = tmp_path / "prepared"
    prepare([src], data, "train:300", val_docs=1, progress=False)
    run = tmp_path / "run"
    Trainer(tiny_config(data, run, steps=2, save_every=2,
                        model_overrides={"window": 32, "chunk_size": 16,
                                         "vocab_size": 300})).train()
    for folder in (run / ckpt.FINAL, sorted((run / "checkpoints").iterdir())[-1]):
        tok = resolve_tokenizer(str(folder))
        assert tok.encode(TEXT) == load_tokenizer(data).encode(TEXT)


def test_compiled_blocks_train_like_eager(data_dir: Path, tmp_path: Path) -> None:
    """compile=true (compiled whole-sequence blocks; the meta-gradient's chunks eager) under
    activation checkpointing gives the eager run's losses (test_model_compile checks the
    compiled model alone)."""
    runs = {}
    for name, kw in {"eager": {},
                     "compiled-ckpt": {"compile": True, "activation_checkpointing": True}}.items():
        trainer = Trainer(tiny_config(data_dir, tmp_path / name, steps=2, eval_every=0,
                                      save_every=0, dtype="float64", **kw))
        assert trainer.module.compile_blocks is bool(kw)
        trainer.train()
        runs[name] = [loss for _, loss in losses(tmp_path / name)]
    assert runs["compiled-ckpt"] == pytest.approx(runs["eager"], rel=1e-9)


def test_evaluation_keeps_no_chunk_graph(data_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation of one sequence at a time takes the chunk graph (forced here, as on a
    GPU), and releases it: the graph's memory is not held through the training steps."""
    from tttlm.model.cuda_graph import ChunkGraph

    made = []
    init = ChunkGraph.__init__

    def counted(self: ChunkGraph, *a: object, **k: object) -> None:
        made.append(self)
        init(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(ChunkGraph, "__init__", counted)
    trainer = Trainer(tiny_config(data_dir, tmp_path, seq_len=128, micro_batch_size=1,
                                  eval_sequences=1))
    trainer.module.graph_chunks = True
    assert trainer.evaluate() is not None
    assert made and not trainer.module._kept_graph.graphs
