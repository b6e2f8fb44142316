"""Two gloo processes on CPU give the same gradients and the same training run as one process
on the combined batch (float64, tiny model)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tttlm.config import TTTConfig
from tttlm.data import Batch, prepare
from tttlm.model.model import TTTForCausalLM
from tttlm.train import distributed as D
from tttlm.train.config import TrainConfig
from tttlm.train.trainer import Trainer, forward_backward

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def tiny_model() -> TTTForCausalLM:
    torch.manual_seed(0)
    config = TTTConfig.from_preset("tiny", "e2e", window=16, chunk_size=8)
    return TTTForCausalLM(config).double()


def make_batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, 256, (4, 41), generator=g)
    rows[1, 10] = rows[3, 0] = 1  # BOS inside: masked targets differ between sequences
    labels = rows[:, 1:]
    return Batch(rows[:, :-1], labels, labels != 1)


def train_config(data: Path, out: Path, parallel: str = "auto") -> TrainConfig:
    return TrainConfig(model="tiny", mode="e2e", data=str(data), out_dir=str(out), seq_len=32,
                       batch_size=4, micro_batch_size=1, steps=2, lr=1e-2, dtype="float64",
                       log_every=1, eval_every=2, eval_sequences=4, save_every=0,
                       progress=False, tensorboard=False, num_threads=1, parallel=parallel,
                       model_overrides={"window": 16, "chunk_size": 8})


def _nonfinite_on_one_rank(rank: int, tmp: Path, data: Path) -> None:
    """Step 1's loss is NaN on rank 1 only (as if the ranks disagreed): every rank must skip
    it, or the replicas drift apart."""
    from tttlm.train import trainer as trainer_module

    real = trainer_module.forward_backward
    trainer: Trainer | None = None

    def faulty(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(*args, **kwargs)
        if rank == 1 and trainer is not None and trainer.step == 0:
            result.loss = float("nan")
        return result

    trainer_module.forward_backward = faulty
    try:
        config = dataclasses.replace(train_config(data, tmp / "run_nan"), mode="full", steps=2,
                                     eval_every=0)
        trainer = Trainer(config)
        trainer.train()
    finally:
        trainer_module.forward_backward = real
    torch.save(D.full_model_state(trainer.model), tmp / f"nan_params_{rank}.pt")


def _worker(rank: int, port: int, tmp: str, data: str, parallel: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        if parallel == "ddp":
            # 1) Gradients: this rank's half of the batch, two micro-batches accumulated.
            model = D.wrap_ddp(tiny_model(), torch.device("cpu"))
            mine = Batch(*(t[2 * rank:2 * rank + 2] for t in make_batch()))
            micro = [Batch(*(t[i:i + 1] for t in mine)) for i in range(2)]
            forward_backward(model, micro, ttt=True, inner_lr=1.0)
            grads = {n: p.grad for n, p in model.module.named_parameters()}
            torch.save(grads, Path(tmp) / f"grads_{rank}.pt")
        # 2) A whole training run through the Trainer, data sharded by the loader.
        trainer = Trainer(train_config(Path(data), Path(tmp) / f"run_{parallel}", parallel))
        summary = trainer.train()
        state = D.full_model_state(trainer.model)
        if rank == 0:
            torch.save(state, Path(tmp) / f"params_{parallel}.pt")
            (Path(tmp) / f"summary_{parallel}.json").write_text(json.dumps(summary))
        if parallel == "ddp":
            _nonfinite_on_one_rank(rank, Path(tmp), Path(data))
        # Every result is written: the parent may tear a rank down that hangs in gloo's
        # teardown (seen once in CI: one rank stuck in destroy_process_group for 15 minutes)
        (Path(tmp) / f"done_{rank}").touch()
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(tmp) / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("text")
    for i in range(6):
        (src / f"d{i}.txt").write_text(f"Document {i}: " + "the quick brown fox. " * (20 + i))
    out = tmp_path_factory.mktemp("prepared")
    prepare([src], out, "bytes", val_docs=1, progress=False)
    return out


# Seconds the ranks may take in all, and after every rank has written its results, how long
# their teardown may take before the parent ends it.
SPAWN_LIMIT, TEARDOWN_GRACE = 600, 30


def _spawn(tmp_path: Path, data: Path, parallel: str) -> None:
    """Run the ranks; fail with their tracebacks if one raises or all run past SPAWN_LIMIT.
    Ranks that wrote every result but hang in the process group's teardown past
    TEARDOWN_GRACE are terminated: what the test checks is already on disk."""
    ctx = None
    try:
        ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path), str(data), parallel),
                       nprocs=WORLD, join=False)
        start = time.monotonic()
        all_done_at = None
        while not ctx.join(timeout=2):
            now = time.monotonic()
            if all_done_at is None and all((tmp_path / f"done_{r}").exists()
                                           for r in range(WORLD)):
                all_done_at = now
            if all_done_at is not None and now - all_done_at > TEARDOWN_GRACE:
                break
            if now - start > SPAWN_LIMIT:
                pytest.fail(f"ranks still running after {SPAWN_LIMIT} s")
    except Exception:
        errors = "\n".join(p.read_text() for p in tmp_path.glob("error_*.txt"))
        pytest.fail(f"worker failed:\n{errors}")
    finally:
        for process in ctx.processes if ctx is not None else []:
            if process.is_alive():
                process.terminate()
                process.join(10)


def single_process_run(data: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    previous = torch.get_num_threads()
    try:
        trainer = Trainer(train_config(data, out))
        summary = trainer.train()
    finally:
        torch.set_num_threads(previous)
    return D.full_model_state(trainer.model), summary


def test_ddp_matches_one_process_on_the_combined_batch(tmp_path: Path, data_dir: Path) -> None:
    _spawn(tmp_path, data_dir, "ddp")

    reference = tiny_model()
    forward_backward(reference, [make_batch()], ttt=True, inner_lr=1.0)
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"grads_{rank}.pt")
        for name, p in reference.named_parameters():
            # float64; only the order of the sums differs: 1e-12 relative.
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-14,
                                       msg=f"rank {rank} {name}")

    params, summary = single_process_run(data_dir, tmp_path / "single")
    ddp_params = torch.load(tmp_path / "params_ddp.pt")
    for name, value in params.items():
        torch.testing.assert_close(ddp_params[name], value, rtol=1e-10, atol=1e-12, msg=name)
    ddp_summary = json.loads((tmp_path / "summary_ddp.json").read_text())
    assert ddp_summary["loss"] == pytest.approx(summary["loss"], rel=1e-10)
    assert ddp_summary["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-10)
    # Each rank wrote its own RNG/loader state into the one checkpoint.
    ckpt_dir = tmp_path / "run_ddp" / "checkpoints" / "step_00000002"
    assert (ckpt_dir / "train_state.pt").is_file() and (ckpt_dir / "rank_00001.pt").is_file()
    # A non-finite step on one rank is skipped by all: the replicas stay equal.
    first = json.loads((tmp_path / "run_nan" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["skipped"] is True and first["nonfinite"] == ["another process"]
    nan_params = [torch.load(tmp_path / f"nan_params_{rank}.pt") for rank in range(WORLD)]
    for name, value in nan_params[0].items():
        assert torch.equal(value, nan_params[1][name]), name


@pytest.mark.skipif(not D.fsdp_available(), reason="FSDP2 needs torch >= 2.6")
def test_fsdp2_matches_one_process(tmp_path: Path, data_dir: Path) -> None:
    _spawn(tmp_path, data_dir, "fsdp")
    params, summary = single_process_run(data_dir, tmp_path / "single")
    fsdp_params = torch.load(tmp_path / "params_fsdp.pt")
    for name, value in params.items():
        torch.testing.assert_close(fsdp_params[name], value, rtol=1e-10, atol=1e-12, msg=name)
    fsdp_summary = json.loads((tmp_path / "summary_fsdp.json").read_text())
    assert fsdp_summary["loss"] == pytest.approx(summary["loss"], rel=1e-10)
