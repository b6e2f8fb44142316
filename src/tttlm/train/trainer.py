"""The training loop: outer AdamW over the meta (or pretrain) loss, with checkpoints.

One optimizer step = ``batch_size`` sequences over all processes, split per process into
micro-batches whose mean losses are averaged (gradient accumulation), then a global-norm
clip, AdamW, and the warmup-cosine schedule. For ``e2e`` the loss is the meta loss of
TTT-E2E (METHOD.md §3) with η = ``model_config.inner_lr_at(step)``.

A run folder has one owner: the trainer (rank 0 under ``torchrun``) holds its lock
(:class:`tttlm.files.FolderLock`) from construction to the end of :meth:`Trainer.train`. A new
run refuses a folder that holds another run unless told to delete it (``overwrite``); a resumed
run refuses a folder with nothing to resume unless ``resume="auto"``.

A step whose loss or gradient norm is NaN or infinite (on any process) is skipped: no optimizer
update, but the step counter, the LR schedule and the data position advance, as PyTorch's
``GradScaler`` does for overflowing fp16 steps, so that the run keeps its length and a bad batch
is not retried forever. It is logged (``"skipped": true`` in ``metrics.jsonl``); after
``max_nonfinite_steps`` such steps in a row the run stops with an error naming the last good
checkpoint. No checkpoint is saved right after a skipped step, and none ever whose weights are
not finite, so rotation never deletes the last finite checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from tttlm.config import TTTConfig
from tttlm.data import Batch, TokenDataset, TokenLoader, check_vocab, load_tokenizer, read_meta
from tttlm.devices import autocast as autocast_to
from tttlm.devices import autocast_dtype, resolve_device
from tttlm.errors import UserError, describe_os_error
from tttlm.files import LOCK_NAME, FolderLock, atomic_write_text
from tttlm.model.model import CONFIG_NAME, WEIGHTS_NAME, TTTForCausalLM, is_ttt_parameter
from tttlm.progress import progress_bar
from tttlm.train import checkpoint as ckpt
from tttlm.train import distributed as D
from tttlm.train import micro_batch
from tttlm.train import static_step as static_step_module
from tttlm.train.config import CONFIG_FILE, TrainConfig, load_config_file
from tttlm.train.gradients import accumulate_gradients, split_micro
from tttlm.train.parallelize import data_parallel, parallelize
from tttlm.train.static_step import StaticStep
from tttlm.train.step_mode import resolve_step_mode
from tttlm.ttt.inner import GradMode

METRICS_FILE = ckpt.METRICS_FILE
# Fields of the model config that fix the shapes of the weights: a checkpoint loads only into a
# model that agrees on all of them.
SHAPE_FIELDS = ("variant", "vocab_size", "hidden_size", "num_layers", "num_heads",
                "intermediate_size", "num_ttt_layers", "prime_intermediate_size",
                # the Llama-family options: other weights, or the same weights meaning another
                # network
                "num_kv_heads", "head_dim", "qk_norm", "post_norms", "rope_layout",
                "rope_freq_scaling", "tie_embeddings", "qkv_bias", "attn_out_bias", "mlp_bias")
_TENSORBOARD_NOTE_SHOWN = False


# ------------------------------------------------------------------------------ schedule
class WarmupCosine:
    """LR multiplier at step ``s``: linear warmup to 1 over ``warmup`` steps (starting at
    ``1/warmup`` so the first step is not wasted), then cosine to ``end_ratio`` at the last step.

    A class rather than a closure so that ``LambdaLR.state_dict`` stores it.
    """

    def __init__(self, steps: int, warmup: int, end_ratio: float) -> None:
        self.steps, self.warmup, self.end_ratio = steps, warmup, end_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay = max(1, self.steps - self.warmup - 1)
        progress = min(1.0, (step - self.warmup) / decay)
        return self.end_ratio + (1 - self.end_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device,
                    capturable: bool = False) -> torch.optim.AdamW:
    """AdamW with decay on every parameter, embedding and norms included (official recipe).
    ``capturable``: its state and step count stay on the device (a CUDA-graph step).

    With ``base_lr_scale < 1`` two param groups: the TTT parameters at ``lr`` first, then the
    rest at ``lr * base_lr_scale``; at 0 the rest is frozen (``requires_grad=False``, not in the
    optimizer). The scheduler scales both groups alike."""
    fused = device.type == "cuda" and not D.is_fsdp(model)
    params: Any = model.parameters()
    if config.base_lr_scale < 1.0:
        named = list(model.named_parameters())
        ttt = [p for name, p in named if is_ttt_parameter(name)]
        base = [p for name, p in named if not is_ttt_parameter(name)]
        if not ttt:
            raise UserError(f"base_lr_scale={config.base_lr_scale}: the model has no TTT "
                            "parameters (prime MLPs) to train apart; use base_lr_scale=1")
        params = [{"params": ttt}]
        if config.base_lr_scale > 0:
            params.append({"params": base, "lr": config.lr * config.base_lr_scale})
        else:
            for p in base:
                p.requires_grad_(False)
    return torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps, weight_decay=config.weight_decay,
                             fused=fused or None, capturable=capturable)


def build_scheduler(optimizer: torch.optim.Optimizer,
                    config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    rule = WarmupCosine(config.steps, config.warmup_steps, config.end_lr / config.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)


# ------------------------------------------------------------------------- one step
@dataclass
class StepResult:
    """Per-process results of :func:`forward_backward` (means over its micro-batches)."""

    loss: float
    inner_update_norm: float
    tokens: int


def forward_backward(model: nn.Module, micro_batches: list[Batch], *, ttt: bool,
                     inner_lr: float, grad_mode: GradMode = GradMode.EXACT,
                     checkpoint_chunks: bool = False,
                     autocast: torch.dtype | None = None) -> StepResult:
    """Accumulate into ``.grad`` the gradient of the mean of the micro-batch losses
    (:func:`tttlm.train.gradients.accumulate_gradients`) and read the results back."""
    loss, norm, tokens = accumulate_gradients(
        model, micro_batches, ttt=ttt, inner_lr=inner_lr, grad_mode=grad_mode,
        checkpoint_chunks=checkpoint_chunks, autocast=autocast)
    return StepResult(float(loss), float(norm), tokens)


@dataclass
class _FolderPlan:
    """What the trainer will change in its run folder once everything else checked out."""

    remove_run: str | None = None  # why the previous run's files are deleted
    corrupt: list[Path] = field(default_factory=list)  # damaged checkpoints, moved aside
    discard: list[Path] = field(default_factory=list)  # checkpoints after the resumed one


def _lock_run_folder(out_dir: Path) -> FolderLock:
    """Own the run folder; a refusal names the owner, and says what to do when the owner is
    another :class:`Trainer` of this very process (a notebook cell run twice)."""
    try:
        return FolderLock(out_dir, "train").acquire()
    except UserError as err:
        try:
            owner = json.loads((out_dir / LOCK_NAME).read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            raise UserError(f"{out_dir} belongs to another Trainer of this process; call its "
                            "close() (train() does it when it ends), or use another "
                            "out_dir") from err
        raise


def _stderr(message: str) -> None:
    tqdm.write(f"tttlm train: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Builds model, data, optimizer and schedule from a :class:`TrainConfig` and trains.

    Args:
        config: the resolved training config.
        resume: ``False`` starts a new run; ``True`` resumes from the newest good checkpoint of
            ``config.out_dir`` (a :class:`UserError` when there is none); ``"auto"`` resumes
            when there is a checkpoint and starts a new run when there is none (for job
            schedulers that requeue); a path resumes from that checkpoint folder, or from the
            newest good checkpoint of that run folder.
        overwrite: a new run deletes the run ``config.out_dir`` holds (its config, metrics,
            checkpoints, final model, TensorBoard events; nothing else) once everything else
            checked out; without it, such a folder is refused.
    """

    def __init__(self, config: TrainConfig, resume: bool | str | os.PathLike[str] = False,
                 overwrite: bool = False) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist = D.init_distributed(self.device)
        # Before the run folder is touched: a step mode this job cannot run is a setting error.
        self.step_plan = resolve_step_mode(
            config.step_mode, compile=config.compile, device=self.device,
            data_parallel=data_parallel(config.parallel),
            activation_checkpointing=config.activation_checkpointing)
        if config.batch_size % self.dist.world_size:
            raise UserError(f"batch_size={config.batch_size} is not divisible by the "
                            f"{self.dist.world_size} processes; change batch_size or the number "
                            "of processes")
        self.local_batch = config.batch_size // self.dist.world_size
        if config.micro_batch_size == micro_batch.AUTO and self.dist.world_size > 1:
            raise UserError("micro_batch_size=auto measures one process's GPU; under torchrun "
                            "give a number (every process must use the same)")
        if (isinstance(config.micro_batch_size, int) and config.micro_batch_size
                and self.local_batch % config.micro_batch_size):
            raise UserError(f"micro_batch_size={config.micro_batch_size} does not divide the "
                            f"per-process batch {self.local_batch}; change micro_batch_size")
        # bf16 autocast on a GPU unless the config says otherwise or the weights are float64
        # (tttlm.devices)
        self.autocast = autocast_dtype(self.device, config.autocast, self._weights_dtype())
        self.step = 0
        self._stop = False
        self._metrics: Any = None
        self._tb: Any = None
        self._lock: FolderLock | None = None
        self._plan = _FolderPlan()
        # (step, folder) of the newest checkpoint known to be good: named by errors.
        self._last_checkpoint: tuple[int, Path] | None = None

        try:
            self.resume_from = self._claim_folder(resume, overwrite)
            self.train_data, self.val_data = self._datasets()
            self.loader = TokenLoader(self.train_data, self.local_batch, seed=config.seed,
                                      rank=self.dist.rank, world_size=self.dist.world_size)
            self.model_config = self._model_config()
            self.model = self._build_model()
            if config.micro_batch_size == micro_batch.AUTO:
                # Before the optimizer allocates anything; the run records the choice.
                self.config = config = replace(
                    config, micro_batch_size=self._auto_micro_batch())
            self.optimizer = build_optimizer(self.model, config, self.device,
                                             capturable=self.step_plan.graph)
            self.scheduler = build_scheduler(self.optimizer, config)
            # step_mode=graph: captured at the first step, after any resume has loaded.
            self.static_step: StaticStep | None = None
            if self.step_plan.graph:
                self.static_step = StaticStep(
                    self.model, self.optimizer, ttt=config.ttt, grad_mode=config.grad_mode,
                    grad_clip=config.grad_clip, micro_batch_size=config.micro_batch_size,
                    autocast=self.autocast, capture=True)
            if self.resume_from is not None:
                self._load_checkpoint(self.resume_from)
            self._apply_plan()
        except BaseException:
            self.close()
            raise

    def _auto_micro_batch(self) -> int:
        """``micro_batch_size=auto`` resolved (:mod:`tttlm.train.micro_batch`): a resumed run's
        recorded choice, else a measurement on the GPU (the whole batch on a CPU)."""
        if self.resume_from is not None:
            for run in (self.out_dir, self.resume_from.parent.parent):
                saved = run / CONFIG_FILE
                if saved.is_file():
                    recorded = load_config_file(saved).get("micro_batch_size")
                    if isinstance(recorded, int) and not isinstance(recorded, bool):
                        return recorded
        c = self.config
        vocab = self.model_config.vocab_size
        tokens = torch.Generator(device="cpu").manual_seed(0)  # the run's RNG is not touched

        def step(m: int) -> None:
            x = torch.randint(0, vocab, (m, c.seq_len + 1), generator=tokens)
            batch = Batch(x[:, :-1], x[:, 1:], torch.ones(m, c.seq_len, dtype=torch.bool))
            try:
                forward_backward(self.model, [batch], ttt=c.ttt,
                                 inner_lr=self.model_config.inner_lr, grad_mode=c.grad_mode,
                                 checkpoint_chunks=c.activation_checkpointing,
                                 autocast=self.autocast)
            finally:
                self.model.zero_grad(set_to_none=True)

        measured = micro_batch.probe(self.device, step)
        if measured is None:
            return 0
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        # AdamW keeps two fp32 moments per trainable weight, allocated at the first step.
        chosen = micro_batch.choose(self.local_batch, *measured, reserve=8 * trainable,
                                    seq_len=c.seq_len)
        _stderr(f"micro_batch_size=auto: {chosen or self.local_batch} sequences per forward "
                "pass")
        return chosen

    # ------------------------------------------------------------- the run folder
    def _claim_folder(self, resume: bool | str | os.PathLike[str],
                      overwrite: bool) -> Path | None:
        """Lock the run folder (rank 0) and decide where to resume from; every rank gets the
        same answer or the same error."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"--out {self.out_dir} is a file, not a folder; choose a folder for "
                            "the run")
        if resume is True and not self.out_dir.is_dir():
            # Most likely a typo in --out: say so without creating the folder.
            raise UserError(f"--resume: {self.out_dir} has no checkpoint to resume from (the "
                            "folder does not exist); check --out, or use --resume=auto to start "
                            "a new run when there is none")
        error: BaseException | None = None
        chosen: Path | None = None
        if self.dist.is_main:
            try:
                self._lock = _lock_run_folder(self.out_dir)
                ckpt.recover_run_folder(self.out_dir)
                chosen = self._decide(resume, overwrite)
            except Exception as err:
                error = err
        if self.dist.enabled:
            text = None if error is None else (describe_os_error(error) if isinstance(
                error, OSError) else None) or str(error)
            chosen_text, text = D.broadcast_object([str(chosen) if chosen else None, text])
            if text is not None and error is None:
                raise UserError(text)
            chosen = Path(chosen_text) if chosen_text else None
        if error is not None:
            raise error
        return chosen

    def _decide(self, resume: bool | str | os.PathLike[str], overwrite: bool) -> Path | None:
        """Rank 0, lock held: the checkpoint to resume from (``None``: a new run), and what to
        change in the folder (:class:`_FolderPlan`, applied once the set-up succeeded)."""
        out = self.out_dir
        held = ckpt.describe_run(out)
        if resume is None or resume is False:
            if held is not None:
                if not overwrite and not ckpt.list_checkpoints(out):
                    raise UserError(f"{out} holds a run ({held}); use a new --out, or "
                                    "--overwrite (or --resume=auto) to replace it")
                if not overwrite:
                    raise UserError(f"{out} holds a run ({held}); use --resume, or a new --out, "
                                    "or --overwrite to delete it")
                self._plan.remove_run = f"deleting the run in {out} ({held}): --overwrite"
            return None
        if resume is True or resume == "auto":
            if overwrite:
                raise UserError("--overwrite deletes the run that --resume would continue; "
                                "use one of them")
            found = self._newest_good(out, resume_flag="--resume")
            if found is not None:
                return found
            if resume is True:
                what = f" (it holds {held})" if held else ""
                raise UserError(f"--resume: {out} has no checkpoint to resume from{what}; "
                                "check --out, or use --resume=auto to start a new run when there "
                                "is none")
            if (out / ckpt.FINAL).is_dir():
                raise UserError(f"{out} holds a finished run but no checkpoint; use a new --out, "
                                "or --overwrite to delete it")
            if held is not None:
                self._plan.remove_run = (f"no checkpoint in {out}: starting a new run "
                                         f"(--resume=auto), replacing its files ({held})")
            return None
        path = Path(resume)
        if (path / ckpt.STATE_FILE).is_file() or (
                path.is_dir() and ckpt.checkpoint_step(path) is not None):
            reason = ckpt.check_checkpoint(path)
            if reason is not None:
                raise UserError(f"--resume {path}: {reason}; resume from another checkpoint")
            chosen: Path | None = path
        elif path.is_dir() and ckpt.list_checkpoints(path):
            chosen = self._newest_good(path, resume_flag=f"--resume {path}")
        else:
            raise UserError(f"--resume {path}: neither a checkpoint folder nor a run folder "
                            "with checkpoints; check the path")
        assert chosen is not None
        inside = chosen.parent.resolve() == (out / ckpt.CHECKPOINTS).resolve()
        if inside:
            if overwrite:
                raise UserError("--overwrite deletes the run that --resume would continue; "
                                "use one of them")
            step = ckpt.checkpoint_step(chosen)
            self._plan.discard = [p for s, p in ckpt.list_checkpoints(out)
                                  if step is not None and s > step
                                  and p not in self._plan.corrupt]
        elif held is not None:
            # Continuing another run's checkpoint into this folder: as for a new run.
            if not overwrite:
                raise UserError(f"{out} holds a run ({held}); use a new --out, or --overwrite "
                                "to delete it")
            self._plan.remove_run = f"deleting the run in {out} ({held}): --overwrite"
        return chosen

    def _newest_good(self, run_dir: Path, resume_flag: str) -> Path | None:
        """The newest checkpoint of ``run_dir`` that :func:`ckpt.check_checkpoint` passes;
        damaged ones are reported and (in this run's folder) moved aside."""
        found = ckpt.list_checkpoints(run_dir)
        reasons = []
        ours = run_dir.resolve() == self.out_dir.resolve()
        for _, path in reversed(found):
            reason = ckpt.check_checkpoint(path)
            if reason is None:
                return path
            reasons.append(f"{path.name}: {reason}")
            _stderr(f"skipping checkpoint {path}: {reason}; trying the one before")
            if ours:
                self._plan.corrupt.append(path)
        if found:
            raise UserError(f"{resume_flag}: no checkpoint of {run_dir} can be loaded "
                            f"({'; '.join(reasons)}); restore one, or start a new run")
        return None

    def _apply_plan(self) -> None:
        """Make the changes :meth:`_decide` planned (rank 0), now that the set-up succeeded."""
        plan = self._plan
        if self.dist.is_main:
            if plan.remove_run:
                _stderr(plan.remove_run)
                ckpt.remove_run(self.out_dir)
            for path in plan.corrupt:
                aside = path.with_name(f".corrupt-{path.name}")
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(path, aside)
                _stderr(f"moved the damaged checkpoint aside to {aside}")
            if plan.discard:
                steps = ", ".join(str(ckpt.checkpoint_step(p)) for p in plan.discard)
                _stderr(f"resuming from {self.resume_from}: deleting the later checkpoints "
                        f"(steps {steps}) of the run it continues")
                for path in plan.discard:
                    shutil.rmtree(path)
        self._plan = _FolderPlan()
        D.barrier()

    def _acquire_lock(self) -> None:
        if self.dist.is_main and (self._lock is None or not self._lock.held):
            self._lock = _lock_run_folder(self.out_dir)

    def close(self) -> None:
        """Close the logs and give up the run folder (also done at the end of :meth:`train`)."""
        self._close_logs()
        if self._lock is not None:
            self._lock.release()

    def _datasets(self) -> tuple[TokenDataset, TokenDataset | None]:
        c = self.config
        if not c.data:
            raise ValueError("no training data: set data=PREPARED_DIR (tttlm data prepare ...)")
        train = TokenDataset(c.data, c.train_split, c.seq_len)
        val = None
        if c.val_split and c.val_split in read_meta(c.data)["splits"]:
            val = TokenDataset(c.data, c.val_split, c.seq_len)
        return train, val

    def _model_config(self) -> TTTConfig:
        c = self.config
        if self.resume_from is not None:
            # The checkpoint knows its architecture; the preset or init_from may have moved.
            base = TTTConfig.from_dict(json.loads((self.resume_from / CONFIG_NAME).read_text()))
            self._check_resumable(base)
            return c.model_config(base)
        if c.init_from is not None:
            source = ckpt.resolve_model_dir(c.init_from)
            base = TTTConfig.from_dict(json.loads((source / CONFIG_NAME).read_text()))
            mc = c.model_config(base)
        else:
            mc = self._preset_model_config()
        check_vocab(self.train_data.meta, mc.vocab_size)
        if mc.bos_token_id != self.train_data.bos_id:
            raise ValueError(f"the model's bos_token_id={mc.bos_token_id} differs from the "
                             f"data's BOS {self.train_data.bos_id}; prepare the data with the "
                             "model's tokenizer")
        return mc

    def _preset_model_config(self) -> TTTConfig:
        """The model of a new run from the preset: size preset, overrides, and the data's
        vocabulary unless the user pinned it."""
        c = self.config
        meta = self.train_data.meta
        data_vocab = dict(vocab_size=meta["vocab_size"], bos_token_id=meta["bos_id"],
                          eos_token_id=meta["eos_id"])
        overrides = {k: v for k, v in data_vocab.items() if k not in c.model_overrides}
        mc = c.model_config()
        return TTTConfig.from_dict({**mc.to_dict(), **overrides})

    def _check_resumable(self, saved: TTTConfig) -> None:
        """Refuse to resume a checkpoint into a model of other shapes (another ``--model``, a
        changed ``model.*`` override, another mode), naming the differing fields."""
        c = self.config
        wanted: dict[str, Any] = {}
        if saved.variant is not c.mode:
            wanted["variant"] = c.mode.value
        else:
            asked = [c.model_config(saved)]
            if c.init_from is None:
                # (a preset that no longer builds with these overrides: the checkpoint rules)
                with contextlib.suppress(ValueError):
                    asked.append(self._preset_model_config())
            for config in asked:
                for name in SHAPE_FIELDS:
                    value = getattr(config, name)
                    if value != getattr(saved, name) and name not in wanted:
                        wanted[name] = value
        if not wanted:
            return
        def show(value: Any) -> Any:
            return getattr(value, "value", value)

        diffs = ", ".join(f"{name}={show(getattr(saved, name))} (this config: {show(value)})"
                          for name, value in wanted.items())
        raise UserError(f"--resume {self.resume_from}: the checkpoint holds another model than "
                        f"this config asks for: {diffs}; resume with the run's own settings "
                        "(drop --model, --mode and --set model.*), or start a new run with "
                        "another --out")

    def _insert_recalls(self, batch: Any) -> Any:
        """Quote passages from beyond the window before their repeats in some sequences
        (``recall_fraction``); seeded by the run's seed, step and rank: resumes are exact."""
        from tttlm.memory.training import insert_recalls

        c, mc = self.config, self.model_config
        assert mc.uses_window
        budget = c.recall_budget or max(10, mc.window // 4)
        augmented, _ = insert_recalls(tuple(batch), window=mc.window,
                                      fraction=c.recall_fraction, budget=budget,
                                      separator=mc.bos_token_id,
                                      seed=(c.seed, self.step, self.dist.rank))
        return type(batch)(*augmented)

    def _weights_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.dtype == "float64" else torch.float32

    def _build_model(self) -> nn.Module:
        c = self.config
        dtype = self._weights_dtype()
        torch.manual_seed(c.seed)
        model = TTTForCausalLM(self.model_config)
        if c.init_from is not None and self.resume_from is None:
            source = ckpt.resolve_model_dir(c.init_from)
            state = load_file(str(source / WEIGHTS_NAME))
            # Weights only: a longer seq_len or other schedule needs no change to them.
            model.load_state_dict(state)
        model.to(device=self.device, dtype=dtype)
        model.lean_head = c.lean_head
        return parallelize(model, activation_checkpointing=c.activation_checkpointing,
                           compile=self.step_plan.compile, parallel=c.parallel,
                           device=self.device)

    @property
    def module(self) -> TTTForCausalLM:
        """The model without its DDP wrapper (an FSDP2 model is its own module)."""
        return D.unwrap(self.model)

    # ---------------------------------------------------------------- checkpoints
    def _any_rank(self, flag: bool) -> bool:
        """``flag`` or'ed over all processes (collective: every rank must call it)."""
        if not self.dist.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def _kept(self) -> str:
        if self._last_checkpoint is None:
            return "no earlier checkpoint of this run was saved"
        step, path = self._last_checkpoint
        return f"the checkpoint of step {step} ({path}) is intact"

    def _raise_if_failed(self, err: BaseException | None, what: str,
                         cleanup: Any = None) -> None:
        """After a write every rank took part in: raise on every rank when any failed (a disk
        error in one line: what failed, what was kept, how to fix)."""
        if not self._any_rank(err is not None):
            return
        if cleanup is not None and self.dist.is_main:
            cleanup()
        if err is None:
            raise UserError(f"another process could not write {what}; {self._kept()}")
        if isinstance(err, OSError):
            described = describe_os_error(err, kept=self._kept())
            if described is not None:
                raise UserError(f"could not write {what}: {described}") from err
        raise err

    def _weights_finite(self) -> bool:
        bad = False
        with torch.no_grad():
            for p in self.model.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 shards
                if not bool(torch.isfinite(local).all()):
                    bad = True
                    break
        return not self._any_rank(bad)

    def _require_finite_weights(self, what: str) -> None:
        if not self._weights_finite():
            raise UserError(f"the weights are not finite (NaN or infinity) at step {self.step}: "
                            f"{what} not saved; {self._last_good()}; lower lr or inner_lr and "
                            "train again")

    def _last_good(self) -> str:
        if self._last_checkpoint is None:
            return "no checkpoint of this run was saved before"
        step, path = self._last_checkpoint
        return f"the last good checkpoint is {path} (step {step})"

    def save_checkpoint(self) -> Path:
        """Write model, optimizer, schedule, RNG and loader position (all ranks call it).

        Refuses (:class:`UserError`) weights that are not finite. A write that fails (disk
        full, size limit) leaves the previous checkpoint as it was and raises one line
        saying so.
        """
        step = self.step
        self._require_finite_weights(f"the checkpoint of step {step}")
        model_state = D.full_model_state(self.model)
        optim_state = D.full_optimizer_state(self.model, self.optimizer)
        what = f"the checkpoint of step {step}"
        def abort() -> None:
            ckpt.abort_checkpoint(self.out_dir, step)

        err: BaseException | None = None
        if self.dist.is_main:
            try:
                ckpt.begin_checkpoint(self.out_dir, step)
            except Exception as e:
                err = ckpt._os_error(e, ckpt.staging_dir(self.out_dir, step)) or e
        # also the barrier: the staging folder exists before any rank writes into it
        self._raise_if_failed(err, what, abort)
        tmp = ckpt.staging_dir(self.out_dir, step)
        rank_state = {"step": step, "rng": ckpt.rng_state(), "loader": self.loader.state_dict()}
        try:
            if self.dist.is_main:
                ckpt.write_model_dir(tmp, model_state, self.model_config)
                self._save_tokenizer(tmp)
                ckpt.save_torch(optim_state, tmp / ckpt.OPTIMIZER_FILE)
                rank_state["scheduler"] = self.scheduler.state_dict()
                rank_state["world_size"] = self.dist.world_size
            ckpt.write_rank_state(tmp, self.dist.rank, rank_state)
        except Exception as e:
            err = ckpt._os_error(e, tmp) or e
        self._raise_if_failed(err, what, abort)
        final = tmp.parent / ckpt.step_dir_name(step)
        if self.dist.is_main:
            try:
                final = ckpt.commit_checkpoint(self.out_dir, step, self.config.keep_checkpoints)
            except Exception as e:
                err = ckpt._os_error(e, final) or e
        self._raise_if_failed(err, what, abort)
        self._last_checkpoint = (step, final)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        try:
            main = ckpt.load_rank_state(path, 0)
            if main.get("world_size", 1) != self.dist.world_size:
                raise UserError(f"{path} was written by {main.get('world_size')} processes, "
                                f"this run has {self.dist.world_size}: resume with the same "
                                "world size")
            mine = main if self.dist.rank == 0 else ckpt.load_rank_state(path, self.dist.rank)
            state = load_file(str(path / WEIGHTS_NAME))
            optim_state = ckpt.load_optimizer_state(path)
            own = static_step_module.implementation(self.optimizer)
        except UserError:
            raise
        except (OSError, RuntimeError, ValueError) as err:
            raise UserError(f"--resume: {path} cannot be read ({err}); resume from an earlier "
                            "checkpoint (--resume CHECKPOINT)") from err
        D.load_full_model_state(self.model, state)
        D.load_full_optimizer_state(self.model, self.optimizer, optim_state)
        # A checkpoint of another step mode (or device) names its own AdamW implementation.
        static_step_module.reapply_implementation(self.optimizer, own)
        self.scheduler.load_state_dict(main["scheduler"])
        self.loader.load_state_dict(mine["loader"])
        ckpt.set_rng_state(mine["rng"])
        self.step = int(main["step"])
        self._last_checkpoint = (self.step, path)
        if self.dist.is_main:
            _stderr(f"resuming from step {self.step} ({path})")

    def _save_tokenizer(self, directory: Path) -> None:
        """Keep the data's tokenizer beside the weights, so that a model folder is enough for
        ``tttlm generate`` and ``tttlm eval``."""
        load_tokenizer(self.config.data).save(directory)

    def save_final(self) -> Path:
        """Write ``final/`` (staged, flushed, swapped in; never weights that are not finite)."""
        self._require_finite_weights("the final model")
        state = D.full_model_state(self.model)
        path = self.out_dir / ckpt.FINAL
        err: BaseException | None = None
        if self.dist.is_main:
            def write(tmp: Path) -> None:
                ckpt.write_model_dir(tmp, state, self.model_config)
                self._save_tokenizer(tmp)

            try:
                ckpt.commit_final(self.out_dir, write)
            except Exception as e:
                err = ckpt._os_error(e, path) or e
        self._raise_if_failed(err, f"the final model ({path}); --resume writes it again")
        return path

    # ------------------------------------------------------------------- logging
    def _open_logs(self) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.out_dir)
        metrics = self.out_dir / METRICS_FILE
        if metrics.exists():
            # Lines written after the step we start from belong to a lost future (a resumed
            # checkpoint's later steps; a line cut short by a kill).
            lines = metrics.read_text(errors="replace").splitlines()
            keep = [line for line in lines if _logged_step(line) is not None
                    and _logged_step(line) <= self.step]  # type: ignore[operator]
            if keep != lines:
                atomic_write_text(metrics, "".join(line + "\n" for line in keep))
        self._metrics = metrics.open("a")
        self._open_tensorboard()

    def _open_tensorboard(self) -> None:
        """``tensorboard=auto``: on when installed; ``true``: says once when it is not."""
        global _TENSORBOARD_NOTE_SHOWN
        if self.config.tensorboard is False:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            if self.config.tensorboard is True and not _TENSORBOARD_NOTE_SHOWN:
                _TENSORBOARD_NOTE_SHOWN = True
                _stderr("tensorboard not installed (pip install tttlm[tensorboard]); metrics go "
                        "to metrics.jsonl only")
            return
        self._tb = SummaryWriter(str(self.out_dir / ckpt.TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main or self._metrics is None:
            return
        # NaN and infinity are not JSON: written as null (the record says which were).
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in record.items()}
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])

    def _close_logs(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # --------------------------------------------------------------------- train
    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics.

        A non-finite loss or gradient norm on any process skips the update on every process
        (the record has ``"skipped": True`` and ``"nonfinite"``); the step counter, the
        schedule and the data position advance all the same.
        """
        c = self.config
        start = time.perf_counter()
        self.model.train()
        inner_lr = self.model_config.inner_lr_at(self.step)
        lr = self.scheduler.get_last_lr()[0]
        batch = next(self.loader)
        if c.recall_fraction > 0:
            batch = self._insert_recalls(batch)
        if self.static_step is not None:
            out = self.static_step(batch, self.scheduler.get_last_lr(), inner_lr)
            result = StepResult(out.loss, out.inner_update_norm, out.tokens)
            grad_norm_value = out.grad_norm
            # The device took the decision already; the vote keeps every rank's the same.
            skipped = self._any_rank(out.skipped)
        else:
            result, grad_norm_value = self._eager_step(batch, inner_lr)
            skipped = None
        nonfinite = [name for name, value in (("loss", result.loss),
                                              ("grad_norm", grad_norm_value))
                     if not math.isfinite(value)]
        if skipped is None:
            # The loss is averaged over processes and DDP's gradients are all-reduced, so every
            # rank sees the same values; the vote makes sure they all take the same decision.
            skipped = self._any_rank(bool(nonfinite))
            if not skipped:
                self.optimizer.step()
        if skipped or self.static_step is not None:
            with warnings.catch_warnings():
                # "scheduler.step() before optimizer.step()": a skipped step, or a replayed
                # graph (its optimizer step runs on the device, unseen by the scheduler)
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - start
        tokens = c.batch_size * c.seq_len
        record: dict[str, Any] = {
            "step": self.step, "loss": result.loss, "grad_norm": grad_norm_value, "lr": lr,
            "inner_lr": inner_lr if c.ttt else None, "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed, "tokens_seen": self.step * tokens,
            "step_mode": self.step_plan.name,
        }
        if c.ttt:
            record["inner_update_norm"] = result.inner_update_norm
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if skipped:
            record["skipped"] = True
            record["nonfinite"] = nonfinite or ["another process"]
        return record

    def _eager_step(self, batch: Batch, inner_lr: float) -> tuple[StepResult, float]:
        """Forward, backward and clip, driven from Python (``eager`` and ``compiled``); the
        caller steps the optimizer when the loss and gradient norm are finite."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        result = forward_backward(
            self.model, split_micro(batch, c.micro_batch_size), ttt=c.ttt, inner_lr=inner_lr,
            grad_mode=c.grad_mode, checkpoint_chunks=c.activation_checkpointing,
            autocast=self.autocast)
        max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()  # FSDP2 returns a sharded (DTensor) norm
        return result, float(grad_norm)

    @torch.no_grad()
    def evaluate(self, max_sequences: int | None = None) -> float | None:
        """Token-weighted mean NLL over the first sequences of the validation split, with the
        same mode as training (TTT on for ``e2e``, at the full η)."""
        if self.val_data is None:
            return None
        c = self.config
        n = len(self.val_data)
        limit = max_sequences if max_sequences is not None else c.eval_sequences
        if limit:
            n = min(n, limit)
        # The same number of sequences on every rank: sharded (FSDP) forwards are collective.
        n -= n % self.dist.world_size
        indices = list(range(self.dist.rank, n, self.dist.world_size))
        micro = c.micro_batch_size or self.local_batch
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        module = self.module  # no DDP hooks in evaluation: nothing to synchronize
        for i in range(0, len(indices), micro):
            input_ids, labels, mask = (t.to(self.device) for t in
                                       self.val_data.batch(indices[i:i + micro]))
            with autocast_to(self.device, self.autocast):
                out = module(input_ids, labels=labels, loss_mask=mask, ttt=c.ttt,
                             inner_lr=self.model_config.inner_lr)
            m = mask.to(torch.float64)
            total += torch.stack([(out.token_nll.double() * m).sum(), m.sum()])
        # A chunk graph kept by an evaluation of one sequence at a time would hold its
        # memory through the training steps until the next evaluation.
        module.release_chunk_graph()
        if self.dist.enabled:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Ctrl-C (SIGINT) or a scheduler's SIGTERM: finish the step, checkpoint, exit."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop:  # second signal: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._stop = True
            if self.dist.is_main:
                tqdm.write(f"{signal.Signals(signum).name}: finishing this step and saving a "
                           "checkpoint (press Ctrl-C again to quit at once)")

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _should_stop(self) -> bool:
        # Every rank must stop at the same step or the collectives would hang.
        return self._any_rank(self._stop)

    def _diverged(self, count: int) -> UserError:
        first = self.step - count + 1
        return UserError(
            f"training stopped: the loss or gradient norm was not finite at {count} steps in a "
            f"row (steps {first}-{self.step}, logged in {self.out_dir / METRICS_FILE}); "
            f"{self._last_good()}; check the data and lower lr or inner_lr (--init-from the "
            "checkpoint starts a new run from its weights), or allow more skipped steps with "
            "--set max_nonfinite_steps=N")

    def train(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``config.steps`` (or stop after step ``until``), evaluate, checkpoint.

        Returns a summary: final step, last training loss, last evaluation loss, whether it
        was interrupted and the wall time. Raises :class:`UserError` when
        ``max_nonfinite_steps`` steps in a row were not finite. Gives up the run folder at
        the end.
        """
        c = self.config
        target = c.steps if until is None else min(until, c.steps)
        self._acquire_lock()
        previous: dict[int, Any] = {}
        bar = None
        start = time.perf_counter()
        last: dict[str, Any] = {}
        eval_loss = None
        interrupted = False
        in_a_row = 0
        try:
            self._open_logs()
            previous = self._install_signal_handlers()
            bar = progress_bar(total=c.steps, initial=self.step, unit="step",
                               dynamic_ncols=True, disable=not (c.progress and self.dist.is_main))
            while self.step < target:
                record = self.train_step()
                last = record
                bar.update(1)
                skipped = bool(record.get("skipped"))
                if skipped:
                    in_a_row += 1
                    if self.dist.is_main:
                        _stderr(f"step {self.step}: non-finite {' and '.join(record['nonfinite'])}"
                                f": update skipped ({in_a_row} in a row; the run stops at "
                                f"{c.max_nonfinite_steps})")
                else:
                    in_a_row = 0
                    # refresh=False: the bar redraws at its own pace (a line per step in logs)
                    bar.set_postfix(loss=f"{record['loss']:.3f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                at_end = self.step == target
                if c.eval_every and self.step % c.eval_every == 0 or (
                        at_end and self.step == c.steps):
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        record["eval_loss"] = eval_loss
                    if eval_loss is not None and self.dist.is_main:
                        bar.write(f"step {self.step}: eval loss {eval_loss:.4f}")
                if c.log_every and self.step % c.log_every == 0 or "eval_loss" in record \
                        or at_end or skipped:
                    self.log(record)
                if in_a_row >= c.max_nonfinite_steps:
                    raise self._diverged(in_a_row)
                if self._should_stop():
                    interrupted = True
                    break
                if c.save_every and self.step % c.save_every == 0 and not at_end \
                        and not skipped:
                    self.save_checkpoint()
            if last:
                self.save_checkpoint()
            if self.step == c.steps:
                self.save_final()
        finally:
            if bar is not None:
                bar.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
            self.close()
        return {"step": self.step, "loss": last.get("loss"), "eval_loss": eval_loss,
                "interrupted": interrupted, "wall_time_s": time.perf_counter() - start,
                "out_dir": str(self.out_dir)}


def _logged_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line (``None`` for a line cut short)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
