"""``micro_batch_size=auto``: the largest micro-batch that fits, measured once and recorded.

The choice (largest divisor whose measured peak plus the optimizer's state fits), its refusal
when nothing fits, the CUDA measurement's out-of-memory signal (faked on a CPU), the trainer's
probe (real forward and backward on the CPU, through a faked measurement: it leaves weights,
gradients and the run's random state as they were) and a resume that reuses the recorded
choice instead of measuring again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_train_faults import error_line
from test_train_trainer import data_dir, tiny_config  # noqa: F401 (fixture)
from tttlm.cli import main
from tttlm.errors import UserError
from tttlm.train import micro_batch
from tttlm.train.config import TrainConfig, parse_overrides
from tttlm.train.trainer import Trainer

GiB = 2**30


def test_candidates_are_the_divisors_largest_first() -> None:
    assert micro_batch.candidates(12) == [12, 6, 4, 3, 2, 1]
    assert micro_batch.candidates(1) == [1]


def test_choose_takes_the_largest_that_fits_with_the_optimizer() -> None:
    asked: list[int] = []

    def peak(m: int) -> int | None:  # 10 GiB a sequence; 16 run out of memory
        asked.append(m)
        return None if m > 8 else 10 * m * GiB

    assert micro_batch.choose(16, peak, 100 * GiB, reserve=5 * GiB, seq_len=64) == 8
    assert asked == [16, 8]
    # The same peaks, but the optimizer's state leaves no room for 8 (80 + 15 > 90).
    assert micro_batch.choose(16, peak, 100 * GiB, reserve=15 * GiB, seq_len=64) == 4
    # The whole batch fits: 0, as an explicit micro_batch_size=0 means.
    assert micro_batch.choose(4, peak, 100 * GiB, reserve=0, seq_len=64) == 0


def test_choose_refuses_when_one_sequence_does_not_fit() -> None:
    with pytest.raises(UserError, match="not even one sequence of 8192 tokens fits") as err:
        micro_batch.choose(2, lambda m: None if m > 1 else 95 * GiB, 100 * GiB, reserve=0,
                           seq_len=8192)
    assert "2: out of memory; 1: 95.0 GiB" in str(err.value)
    assert "activation_checkpointing=true" in str(err.value)


def test_probe_reads_the_peak_and_the_out_of_memory_signal(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    assert micro_batch.probe(torch.device("cpu"), lambda m: None) is None
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 7 * GiB)

    class Props:
        total_memory = 80 * GiB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: Props())

    def step(m: int) -> None:
        if m > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")

    measured = micro_batch.probe(torch.device("cuda"), step)
    assert measured is not None
    peak, capacity = measured
    assert capacity == 80 * GiB and peak(2) == 7 * GiB and peak(3) is None


def test_auto_is_parsed_and_checked(tmp_path: Path) -> None:
    assert parse_overrides(["micro_batch_size=auto"]) == {"micro_batch_size": "auto"}
    assert parse_overrides(["micro_batch_size=4"]) == {"micro_batch_size": 4}
    with pytest.raises(ValueError, match="micro_batch_size='most' must be an integer or 'auto'"):
        TrainConfig(micro_batch_size="most")


def test_cli_refuses_a_bad_micro_batch(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "tiny", "--micro-batch-size", "many", "--out",
              str(tmp_path / "r")])
    assert exit_.value.code == 2
    assert "'many' is not a number of sequences; give N or 'auto'" in error_line(capsys)


def test_auto_on_a_cpu_is_the_whole_batch(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", micro_batch_size="auto", steps=2))
    try:
        assert trainer.config.micro_batch_size == 0
        trainer.train()
    finally:
        trainer.close()
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["micro_batch_size"] == 0


def test_the_probe_measures_without_changing_the_run(data_dir: Path, tmp_path: Path,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's probe runs real steps (here on the CPU, measured by a fake): weights,
    gradients and the global RNG are as without it, and the choice is recorded."""
    ran: list[int] = []

    def fake_probe(device: torch.device, step):  # type: ignore[no-untyped-def]
        def peak(m: int) -> int | None:
            step(m)
            ran.append(m)
            return None if m > 2 else m * GiB
        return peak, 100 * GiB

    monkeypatch.setattr(micro_batch, "probe", fake_probe)
    torch.manual_seed(123)
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", micro_batch_size="auto",
                                  steps=2))
    try:
        after = torch.rand(1)
        torch.manual_seed(123)
        reference = Trainer(tiny_config(data_dir, tmp_path / "ref", micro_batch_size=2,
                                        steps=2))
        try:
            assert torch.equal(after, torch.rand(1))  # the probe drew no global random number
            assert ran == [4, 2] and trainer.config.micro_batch_size == 2
            for (name, p), q in zip(trainer.model.named_parameters(),
                                    reference.model.parameters()):
                assert p.grad is None and torch.equal(p, q), name
            trainer.train()
            reference.train()
        finally:
            reference.close()
    finally:
        trainer.close()
    for run in ("run", "ref"):
        assert json.loads((tmp_path / run / "train_config.json").read_text())[
            "micro_batch_size"] == 2
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2


def test_resume_reuses_the_recorded_choice(data_dir: Path, tmp_path: Path,  # noqa: F811
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first = Trainer(tiny_config(data_dir, tmp_path / "run", micro_batch_size=2, steps=4))
    try:
        first.train(until=2)
    finally:
        first.close()

    def never(*args: object) -> None:
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(micro_batch, "probe", never)
    resumed = Trainer(tiny_config(data_dir, tmp_path / "run", micro_batch_size="auto",
                                  steps=4), resume=True)
    try:
        assert resumed.config.micro_batch_size == 2
    finally:
        resumed.close()
