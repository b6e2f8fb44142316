"""``step_mode`` (auto, eager, compiled, graph): the setting, its refusals, and on a CPU the
captured step's function run un-captured (:class:`StaticStep`, ``capture=False``), which must
train bit for bit as the eager step: skipped non-finite steps, warm-up and resume included."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch

from _helpers import prepared_corpus
from test_train_faults import error_line, fast_args
from test_train_trainer import losses, tiny_config
from tttlm.cli import main
from tttlm.errors import UserError
from tttlm.train import checkpoint as ckpt
from tttlm.train.config import Parallel, StepMode, TrainConfig, resolve_config
from tttlm.train.static_step import (
    StaticStep,
    implementation,
    preserved,
    prime_optimizer_state,
    reapply_implementation,
    state_tensors,
)
from tttlm.train.step_mode import resolve_step_mode
from tttlm.train.trainer import Trainer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_corpus(tmp_path_factory)


def uncaptured(trainer: Trainer, warmup: int = 2) -> StaticStep:
    """The step ``step_mode=graph`` captures, run as it is, installed in ``trainer``."""
    c = trainer.config
    trainer.static_step = StaticStep(
        trainer.model, trainer.optimizer, ttt=c.ttt, grad_mode=c.grad_mode,
        grad_clip=c.grad_clip, micro_batch_size=c.micro_batch_size, autocast=trainer.autocast,
        capture=False, warmup=warmup)
    return trainer.static_step


def assert_same_training_state(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for key, state in sa["state"].items():
        for name, value in state.items():
            other = sb["state"][key][name]
            assert value.dtype == other.dtype and torch.equal(value, other), (key, name)
    assert sa["param_groups"] == sb["param_groups"]
    assert a.scheduler.state_dict() == b.scheduler.state_dict()


# ------------------------------------------------------------------------------ setting
def test_the_setting_and_its_one_line_errors(data_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert TrainConfig().step_mode is StepMode.AUTO
    config = resolve_config("debug", sets=["step_mode=graph"])
    assert config.step_mode is StepMode.GRAPH and config.to_dict()["step_mode"] == "graph"
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"^step_mode='fast' is not known; use one of auto, "
                                         r"eager, compiled, graph$"):
        TrainConfig(step_mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^step_mode=eager contradicts compile=true; use "
                                         r"step_mode=compiled, or compile=false$"):
        TrainConfig(step_mode="eager", compile=True)  # type: ignore[arg-type]

    for setting, line in [
        ("step_mode=fast", "tttlm train: error: step_mode='fast' is not known; use one of "
                           "auto, eager, compiled, graph"),
        ("step_mode=graph", "tttlm train: error: step_mode=graph needs a CUDA device; use "
                            "step_mode=eager"),
    ]:
        run = tmp_path / setting.replace("=", "-")
        assert main(fast_args(data_dir, run, "--device", "cpu", "--set", setting)) == 2
        assert error_line(capsys) == line
        assert not run.exists()  # refused before the run folder is touched


def test_resolution() -> None:
    def plan(mode: str, device: torch.device = CUDA, compile: bool = False,
             parallel: Parallel | None = None, checkpointing: bool = False) -> str:
        return resolve_step_mode(mode, compile=compile, device=device, data_parallel=parallel,
                                 activation_checkpointing=checkpointing).name

    # auto: the captured step where it applies (one CUDA device, no checkpointing), else
    # eager or compiled
    assert plan("auto", CPU) == "eager"
    assert plan("auto", CPU, compile=True) == "compiled"
    assert plan("auto") == "graph"
    assert plan("auto", compile=True) == "compiled-graph"
    for parallel in (Parallel.DDP, Parallel.FSDP):
        assert plan("auto", parallel=parallel) == "eager"
        assert plan("auto", parallel=parallel, compile=True) == "compiled"
    assert plan("auto", checkpointing=True, compile=True) == "compiled"
    assert plan("auto", checkpointing=True) == "eager"
    # explicit modes
    assert plan("eager") == "eager" and plan("compiled", CPU) == "compiled"
    assert plan("graph") == "graph" and plan("graph", compile=True) == "compiled-graph"
    with pytest.raises(UserError, match=r"^step_mode=graph needs a CUDA device; use "
                                        r"step_mode=compiled$"):
        plan("graph", CPU, compile=True)
    with pytest.raises(UserError, match=r"^step_mode=graph does not support parallel=ddp .*; "
                                        r"use step_mode=eager$"):
        plan("graph", parallel=Parallel.DDP)
    with pytest.raises(UserError, match=r"^step_mode=graph does not support parallel=fsdp"):
        plan("graph", parallel=Parallel.FSDP)
    with pytest.raises(UserError, match=r"^step_mode=graph does not support "
                                        r"activation_checkpointing=true"):
        plan("graph", checkpointing=True)
    with pytest.raises(UserError, match="contradicts compile=true"):
        plan("eager", compile=True)


def test_auto_is_eager_on_a_cpu(data_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(data_dir, tmp_path, device="cpu", steps=1, eval_every=0))
    assert trainer.step_plan.name == "eager" and trainer.static_step is None
    assert not trainer.module.compile_blocks
    trainer.train()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step_mode"] for line in lines] == ["eager"]
    compiled = Trainer(tiny_config(data_dir, tmp_path / "c", device="cpu", step_mode="compiled"))
    assert compiled.step_plan.name == "compiled" and compiled.module.compile_blocks
    compiled.close()


# ------------------------------------------------------------- the step, un-captured
def test_uncaptured_static_step_is_the_eager_step_bit_for_bit(data_dir: Path,
                                                              tmp_path: Path) -> None:
    """Six float64 e2e steps over two micro-batches, LR and η changing at every step (η warms
    up over 3), η = NaN at step 3 (a NaN loss and gradient), an infinite gradient at step 5
    (a finite loss): the static step (device LR and η, on-device skip by select, warm-up on
    the real weights then restored) reports and leaves exactly what the eager trainer does."""
    def make(name: str) -> Trainer:
        return Trainer(tiny_config(data_dir, tmp_path / name, dtype="float64", steps=6,
                                   inner_lr_warmup_frac=0.5, eval_every=0, save_every=0))

    eager, static = make("eager"), make("static")
    uncaptured(static)
    eta = eager.model_config.inner_lr
    etas: list[float] = []
    lrs: list[float] = []
    for step in range(6):
        records = []
        for trainer in (eager, static):
            if step == 2:
                trainer.model_config.inner_lr = math.nan  # what validation refuses
            weight = next(trainer.model.parameters())
            # a gradient that is not finite, under a finite loss
            hook = weight.register_hook(lambda g: g * math.inf) if step == 4 else None
            records.append(trainer.train_step())
            trainer.model_config.inner_lr = eta
            if hook is not None:
                hook.remove()
        a, b = records
        for key in ("step", "loss", "grad_norm", "lr", "inner_lr", "inner_update_norm",
                    "skipped", "nonfinite"):
            assert (a.get(key) == b.get(key)) or (a[key] != a[key] and b[key] != b[key]), \
                (step, key, a.get(key), b.get(key))
        assert a.get("nonfinite") == {2: ["loss", "grad_norm"], 4: ["grad_norm"]}.get(step)
        etas.append(a["inner_lr"])
        lrs.append(a["lr"])
    # both schedules move from step to step: the device tensors are refilled every time
    assert etas[0] < etas[1] < etas[3] == eta and len(set(lrs)) == 5  # LR: warm-up, cosine
    assert_same_training_state(eager, static)
    eager.close()
    static.close()


def test_warmup_leaves_weights_optimizer_state_and_rng_as_they_were(data_dir: Path,
                                                                    tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(data_dir, tmp_path, steps=4, eval_every=0, save_every=0))
    trainer.train_step()  # AdamW has state now
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    tensors = state_tensors(params, trainer.optimizer)
    assert len(tensors) == 4 * len(params)  # weights, step, exp_avg, exp_avg_sq
    before = [t.clone() for t in tensors]
    addresses = [t.data_ptr() for t in tensors]
    torch.manual_seed(7)
    random.seed(7)
    with preserved(tensors):
        trainer.train_step()
        trainer.train_step()
        torch.rand(5), random.random()
        assert not all(torch.equal(a, b) for a, b in zip(tensors, before))
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    assert [t.data_ptr() for t in tensors] == addresses  # in place: a graph keeps them
    after = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()
    trainer.close()


def test_primed_state_is_adamw_first_step_state() -> None:
    """A skipped first static step leaves primed zeros where eager AdamW has no state yet;
    the next step from them is AdamW's first step bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    twin = copy.deepcopy(model)
    lazy = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    primed = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    prime_optimizer_state(primed)
    for m, opt in ((model, lazy), (twin, primed)):
        m(torch.ones(2, 4, dtype=torch.float64)).square().sum().backward()
        opt.step()
    assert lazy.state_dict().keys() == primed.state_dict().keys()
    for (a, b) in zip(lazy.state_dict()["state"].values(), primed.state_dict()["state"].values()):
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].device == b[k].device
            assert torch.equal(a[k], b[k]), k
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="Adam"):
        prime_optimizer_state(torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_checkpoint_does_not_choose_the_adamw_implementation() -> None:
    model = torch.nn.Linear(4, 3)
    saved = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    model(torch.ones(2, 4)).sum().backward()
    saved.step()
    ours = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=None)
    own = implementation(ours)
    ours.load_state_dict(saved.state_dict())
    assert ours.param_groups[0]["foreach"] is False  # torch takes the checkpoint's
    reapply_implementation(ours, own)
    assert ours.param_groups[0]["foreach"] is None
    assert all(s["step"].device.type == "cpu" for s in ours.state.values())


def test_resume_with_the_static_step_is_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    """Eager 6 steps == eager 3, stop, resume with the static step for 3 == static 6: losses,
    weights, optimizer state and schedule, bit for bit (checkpoints do not know the mode)."""
    straight = Trainer(tiny_config(data_dir, tmp_path / "eager", eval_every=0))
    straight.train()

    first = Trainer(tiny_config(data_dir, tmp_path / "mixed", eval_every=0))
    first.train(until=3)
    torch.manual_seed(1234)  # resume must restore the RNG, not inherit it
    resumed = Trainer(tiny_config(data_dir, tmp_path / "mixed", eval_every=0), resume=True)
    assert resumed.step == 3
    uncaptured(resumed)
    resumed.train()

    static = Trainer(tiny_config(data_dir, tmp_path / "static", eval_every=0))
    uncaptured(static)
    static.train()

    assert losses(tmp_path / "eager") == losses(tmp_path / "mixed") == losses(tmp_path / "static")
    assert_same_training_state(straight, resumed)
    assert_same_training_state(straight, static)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "static")] == [4, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_mode_trains_like_eager_on_a_gpu(data_dir: Path, tmp_path: Path) -> None:
    """step_mode=graph through the trainer: captured once, then replayed; the losses of eager
    steps (fused AdamW reads a float32 LR from the device: not bit for bit), a NaN step
    skipped on the device, and warm-up without a trace on the first step."""
    def make(name: str, mode: str) -> Trainer:
        return Trainer(tiny_config(data_dir, tmp_path / name, device="cuda", autocast="none",
                                   step_mode=mode, steps=6, eval_every=0, save_every=0))

    eager, graph = make("eager", "eager"), make("graph", "graph")
    assert graph.step_plan.name == "graph" and graph.static_step is not None
    eta = eager.model_config.inner_lr
    for step in range(6):
        records = []
        for trainer in (eager, graph):
            if step == 3:
                trainer.model_config.inner_lr = 1e30
            records.append(trainer.train_step())
            trainer.model_config.inner_lr = eta
        a, b = records
        assert bool(a.get("skipped")) is bool(b.get("skipped")) is (step == 3)
        if step != 3:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for (name, x), (_, y) in zip(eager.module.state_dict().items(),
                                 graph.module.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=name)
    eager.close()
    graph.close()
