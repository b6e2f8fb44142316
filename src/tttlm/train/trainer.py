"""The training loop: outer AdamW over the meta (or pretrain) loss, with checkpoints.

One optimizer step = ``batch_size`` sequences over all processes, split per process into
micro-batches whose mean losses are averaged (gradient accumulation), then a global-norm
clip, AdamW, and the warmup-cosine schedule. For ``e2e`` the loss is the meta loss of
TTT-E2E (METHOD.md §3) with η = ``model_config.inner_lr_at(step)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from tttlm.config import TTTConfig
from tttlm.data import Batch, TokenDataset, TokenLoader, check_vocab, load_tokenizer, read_meta
from tttlm.model.model import CONFIG_NAME, WEIGHTS_NAME, TTTForCausalLM
from tttlm.train import checkpoint as ckpt
from tttlm.train import distributed as D
from tttlm.train.config import Parallel, TrainConfig
from tttlm.ttt.inner import GradMode

METRICS_FILE = "metrics.jsonl"


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


def build_optimizer(model: nn.Module, config: TrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on every parameter, embedding and norms included (official recipe)."""
    fused = device.type == "cuda" and not D.is_fsdp(model)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps, weight_decay=config.weight_decay,
                             fused=fused or None)


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


def split_micro(batch: Batch, micro: int) -> list[Batch]:
    """Cut a ``[B, T]`` batch into micro-batches of ``micro`` sequences (0: one piece)."""
    B = batch.input_ids.shape[0]
    if micro <= 0 or micro >= B:
        return [batch]
    return [Batch(*(t[i:i + micro] for t in batch)) for i in range(0, B, micro)]


def forward_backward(model: nn.Module, micro_batches: list[Batch], *, ttt: bool,
                     inner_lr: float, grad_mode: GradMode = GradMode.EXACT,
                     checkpoint_chunks: bool = False,
                     autocast: torch.dtype | None = None) -> StepResult:
    """Accumulate into ``.grad`` the gradient of the mean of the micro-batch losses.

    Each micro-batch loss is already a mean over its sequences, so with equal micro-batches this
    equals the gradient of the whole batch's loss. Under DDP the all-reduce runs only after the
    last micro-batch (``no_sync``); FSDP2 likewise defers its reduce-scatter.
    """
    device = next(model.parameters()).device
    n = len(micro_batches)
    losses, norms, tokens = [], [], 0
    for i, part in enumerate(micro_batches):
        last = i == n - 1
        if hasattr(model, "no_sync") and not last:
            sync: Any = model.no_sync()
        else:
            sync = contextlib.nullcontext()
        if D.is_fsdp(model):
            model.set_requires_gradient_sync(last)  # type: ignore[operator]
        input_ids, labels, mask = (t.to(device, non_blocking=True) for t in part)
        amp = (torch.autocast(device.type, dtype=autocast) if autocast is not None
               else contextlib.nullcontext())
        with sync:
            with amp:
                out = model(input_ids, labels=labels, loss_mask=mask, ttt=ttt, inner_lr=inner_lr,
                            grad_mode=grad_mode, checkpoint_chunks=checkpoint_chunks)
            (out.loss / n).backward()
        losses.append(out.loss.detach())
        if ttt and out.inner_update_norms is not None and out.inner_update_norms.numel():
            norms.append(out.inner_update_norms.detach().float().mean())
        tokens += input_ids.numel()
    # float64 so that reported losses of float64 runs keep their precision
    loss = torch.stack(losses).double().mean()
    norm = torch.stack(norms).double().mean() if norms else torch.zeros_like(loss)
    both = D.all_reduce_mean(torch.stack([loss, norm]))
    return StepResult(float(both[0]), float(both[1]), tokens)


# ---------------------------------------------------------------------- model set-up
def apply_activation_checkpointing(model: TTTForCausalLM) -> None:
    """Recompute every whole-sequence block in the backward pass; the TTT chunks are
    checkpointed by the model itself (``checkpoint_chunks``)."""
    for layer in model.layers:
        original = layer.forward_sequence

        def wrapped(*args: Any, _f: Any = original, **kwargs: Any) -> torch.Tensor:
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        layer.forward_sequence = wrapped  # type: ignore[method-assign]


def apply_compile(model: TTTForCausalLM) -> None:
    """Compile the blocks (``TTTForCausalLM.compile_blocks``): whole-sequence blocks, and TTT
    chunks in evaluation; the meta-gradient's chunks stay eager."""
    model.compile_blocks = True


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Builds model, data, optimizer and schedule from a :class:`TrainConfig` and trains.

    Args:
        config: the resolved training config.
        resume: ``True`` resumes from the newest checkpoint of ``config.out_dir`` (a no-op when
            there is none), a path resumes from that checkpoint folder, ``False`` starts fresh.
    """

    def __init__(self, config: TrainConfig, resume: bool | str | os.PathLike[str] = False) -> None:
        self.config = config
        self.out_dir = Path(config.out_dir)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist = D.init_distributed(self.device)
        if config.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                             f"{self.dist.world_size} processes")
        self.local_batch = config.batch_size // self.dist.world_size
        if config.micro_batch_size and self.local_batch % config.micro_batch_size:
            raise ValueError(f"micro_batch_size={config.micro_batch_size} does not divide the "
                             f"per-process batch {self.local_batch}")
        self.autocast = self._autocast_dtype()

        self.resume_from = self._find_resume(resume)
        self.train_data, self.val_data = self._datasets()
        self.loader = TokenLoader(self.train_data, self.local_batch, seed=config.seed,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        self.model_config = self._model_config()
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.step = 0
        self._stop = False
        self._metrics: Any = None
        self._tb: Any = None
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

    # ---------------------------------------------------------------------- set-up
    def _autocast_dtype(self) -> torch.dtype | None:
        mode = self.config.autocast
        if mode == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return torch.bfloat16 if mode == "bf16" else None

    def _find_resume(self, resume: bool | str | os.PathLike[str]) -> Path | None:
        if resume is False or resume is None:
            return None
        if resume is True:
            return ckpt.latest_checkpoint(self.out_dir)
        path = Path(resume)
        if (path / ckpt.STATE_FILE).is_file():
            return path
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"--resume {path}: neither a checkpoint folder nor a run "
                                    "folder with checkpoints")
        return latest

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
            return c.model_config(base)
        if c.init_from is not None:
            source = ckpt.resolve_model_dir(c.init_from)
            base = TTTConfig.from_dict(json.loads((source / CONFIG_NAME).read_text()))
            mc = c.model_config(base)
        else:
            meta = self.train_data.meta
            data_vocab = dict(vocab_size=meta["vocab_size"], bos_token_id=meta["bos_id"],
                              eos_token_id=meta["eos_id"])
            # The data decides the vocabulary unless the user pinned it.
            overrides = {k: v for k, v in data_vocab.items() if k not in c.model_overrides}
            mc = c.model_config()
            mc = TTTConfig.from_dict({**mc.to_dict(), **overrides})
        check_vocab(self.train_data.meta, mc.vocab_size)
        if mc.bos_token_id != self.train_data.bos_id:
            raise ValueError(f"the model's bos_token_id={mc.bos_token_id} differs from the "
                             f"data's BOS {self.train_data.bos_id}; prepare the data with the "
                             "model's tokenizer")
        return mc

    def _build_model(self) -> nn.Module:
        c = self.config
        dtype = torch.float64 if c.dtype == "float64" else torch.float32
        torch.manual_seed(c.seed)
        model = TTTForCausalLM(self.model_config)
        if c.init_from is not None and self.resume_from is None:
            source = ckpt.resolve_model_dir(c.init_from)
            state = load_file(str(source / WEIGHTS_NAME))
            # Weights only: a longer seq_len or other schedule needs no change to them.
            model.load_state_dict(state)
        model.to(device=self.device, dtype=dtype)
        model.lean_head = c.lean_head
        if c.activation_checkpointing:
            apply_activation_checkpointing(model)
        if c.compile:
            apply_compile(model)
        parallel = c.parallel
        if parallel is Parallel.AUTO:
            parallel = Parallel.DDP if self.dist.enabled else None  # type: ignore[assignment]
        if parallel is Parallel.FSDP:
            return D.wrap_fsdp(model)
        if parallel is Parallel.DDP and self.dist.enabled:
            return D.wrap_ddp(model, self.device)
        return model

    @property
    def module(self) -> TTTForCausalLM:
        """The model without its DDP wrapper (an FSDP2 model is its own module)."""
        return D.unwrap(self.model)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write model, optimizer, schedule, RNG and loader position (all ranks call it)."""
        step = self.step
        model_state = D.full_model_state(self.model)
        optim_state = D.full_optimizer_state(self.model, self.optimizer)
        if self.dist.is_main:
            ckpt.begin_checkpoint(self.out_dir, step)
        D.barrier()  # the staging folder exists before any rank writes into it
        tmp = ckpt.staging_dir(self.out_dir, step)
        rank_state = {"step": step, "rng": ckpt.rng_state(), "loader": self.loader.state_dict()}
        if self.dist.is_main:
            ckpt.write_model_dir(tmp, model_state, self.model_config)
            self._save_tokenizer(tmp)
            torch.save(optim_state, tmp / ckpt.OPTIMIZER_FILE)
            rank_state["scheduler"] = self.scheduler.state_dict()
            rank_state["world_size"] = self.dist.world_size
        ckpt.write_rank_state(tmp, self.dist.rank, rank_state)
        D.barrier()
        final = ckpt.staging_dir(self.out_dir, step).parent / ckpt.step_dir_name(step)
        if self.dist.is_main:
            final = ckpt.commit_checkpoint(self.out_dir, step, self.config.keep_checkpoints)
        D.barrier()
        return final

    def _load_checkpoint(self, path: Path) -> None:
        main = ckpt.load_rank_state(path, 0)
        if main.get("world_size", 1) != self.dist.world_size:
            raise ValueError(f"{path} was written by {main.get('world_size')} processes, this "
                             f"run has {self.dist.world_size}: resume with the same world size")
        mine = main if self.dist.rank == 0 else ckpt.load_rank_state(path, self.dist.rank)
        state = load_file(str(path / WEIGHTS_NAME))
        D.load_full_model_state(self.model, state)
        D.load_full_optimizer_state(self.model, self.optimizer, ckpt.load_optimizer_state(path))
        self.scheduler.load_state_dict(main["scheduler"])
        self.loader.load_state_dict(mine["loader"])
        ckpt.set_rng_state(mine["rng"])
        self.step = int(main["step"])

    def _save_tokenizer(self, directory: Path) -> None:
        """Keep the data's tokenizer beside the weights, so that a model folder is enough for
        ``tttlm generate`` and ``tttlm eval``."""
        load_tokenizer(self.config.data).save(directory)

    def save_final(self) -> Path:
        state = D.full_model_state(self.model)
        path = self.out_dir / ckpt.FINAL
        if self.dist.is_main:
            tmp = self.out_dir / f".tmp-{ckpt.FINAL}"
            if tmp.exists():
                shutil.rmtree(tmp)
            ckpt.write_model_dir(tmp, state, self.model_config)
            self._save_tokenizer(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        D.barrier()
        return path

    # ------------------------------------------------------------------- logging
    def _open_logs(self) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.out_dir)
        metrics = self.out_dir / METRICS_FILE
        if metrics.exists() and self.resume_from is not None:
            # Lines written after the checkpoint we resume from belong to a lost future.
            keep = [line for line in metrics.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= self.step]
            metrics.write_text("".join(line + "\n" for line in keep))
        elif metrics.exists():
            metrics.unlink()
        self._metrics = metrics.open("a")
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._tb = None
            else:
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main or self._metrics is None:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
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
        """One optimizer step; returns its metrics."""
        c = self.config
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        inner_lr = self.model_config.inner_lr_at(self.step)
        lr = self.scheduler.get_last_lr()[0]
        batch = next(self.loader)
        result = forward_backward(
            self.model, split_micro(batch, c.micro_batch_size), ttt=c.ttt, inner_lr=inner_lr,
            grad_mode=c.grad_mode, checkpoint_chunks=c.activation_checkpointing,
            autocast=self.autocast)
        max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()  # FSDP2 returns a sharded (DTensor) norm
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        grad_norm_value = float(grad_norm)
        elapsed = time.perf_counter() - start
        tokens = c.batch_size * c.seq_len
        record: dict[str, Any] = {
            "step": self.step, "loss": result.loss, "grad_norm": grad_norm_value, "lr": lr,
            "inner_lr": inner_lr if c.ttt else None, "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed, "tokens_seen": self.step * tokens,
        }
        if c.ttt:
            record["inner_update_norm"] = result.inner_update_norm
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return record

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
            amp = (torch.autocast(self.device.type, dtype=self.autocast)
                   if self.autocast is not None else contextlib.nullcontext())
            with amp:
                out = module(input_ids, labels=labels, loss_mask=mask, ttt=c.ttt,
                             inner_lr=self.model_config.inner_lr)
            m = mask.to(torch.float64)
            total += torch.stack([(out.token_nll.double() * m).sum(), m.sum()])
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
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        if self.dist.enabled:
            # Every rank must stop at the same step or the collectives would hang.
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def train(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``config.steps`` (or stop after step ``until``), evaluate, checkpoint.

        Returns a summary: final step, last training loss, last evaluation loss, whether it
        was interrupted and the wall time.
        """
        c = self.config
        target = c.steps if until is None else min(until, c.steps)
        self._open_logs()
        previous = self._install_signal_handlers()
        bar = tqdm(total=c.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (c.progress and self.dist.is_main))
        start = time.perf_counter()
        last: dict[str, Any] = {}
        eval_loss = None
        interrupted = False
        try:
            while self.step < target:
                record = self.train_step()
                last = record
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                at_end = self.step == target
                if c.eval_every and self.step % c.eval_every == 0 or (
                        at_end and self.step == c.steps):
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        record["eval_loss"] = eval_loss
                    if eval_loss is not None and self.dist.is_main:
                        bar.write(f"step {self.step}: eval loss {eval_loss:.4f}")
                if c.log_every and self.step % c.log_every == 0 or "eval_loss" in record \
                        or at_end:
                    self.log(record)
                if self._should_stop():
                    interrupted = True
                    break
                if c.save_every and self.step % c.save_every == 0 and not at_end:
                    self.save_checkpoint()
            if last:
                self.save_checkpoint()
            if self.step == c.steps:
                self.save_final()
        finally:
            bar.close()
            self._close_logs()
            for sig, old in previous.items():
                signal.signal(sig, old)
        return {"step": self.step, "loss": last.get("loss"), "eval_loss": eval_loss,
                "interrupted": interrupted, "wall_time_s": time.perf_counter() - start,
                "out_dir": str(self.out_dir)}
