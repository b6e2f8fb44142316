"""Training configuration: one typed dataclass, resolved from a preset, a file and overrides.

Resolution order (later wins): a named preset (:data:`PRESETS`), a JSON config file, then
``key=value`` overrides (``--set`` on the command line). Keys prefixed ``model.`` go to
``model_overrides`` and reach :meth:`tttlm.config.TTTConfig.from_preset`, e.g.
``--set model.window=256``. The resolved config is written to every run folder, so a run can
always be repeated from its own ``train_config.json``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tttlm.config import MAX_INNER_LR, TTTConfig, Variant, check_number
from tttlm.config import PRESETS as MODEL_PRESETS
from tttlm.devices import AUTOCAST_CHOICES, check_device_name
from tttlm.files import atomic_write_text
from tttlm.ttt.modes import GradMode

CONFIG_FILE = "train_config.json"


class Parallel(str, enum.Enum):
    """How a model is spread over the processes of a ``torchrun`` job."""

    AUTO = "auto"  # DDP when there is more than one process, else nothing
    DDP = "ddp"  # a full replica per process, gradients all-reduced
    FSDP = "fsdp"  # FSDP2 (fully_shard): parameters, gradients and optimizer state sharded


class StepMode(str, enum.Enum):
    """How one optimizer step runs (:mod:`tttlm.train.step_mode` resolves ``auto``)."""

    AUTO = "auto"  # the fastest that applies: graph on one CUDA device, else eager
    EAGER = "eager"  # Python drives every kernel
    COMPILED = "compiled"  # eager step, blocks compiled (what compile=true does)
    GRAPH = "graph"  # the whole step captured once as a CUDA graph and replayed


@dataclass
class TrainConfig:
    """Everything ``tttlm train`` needs to reproduce a run.

    Attributes:
        model: model size preset (``tiny 125m 350m 760m 1b 3b``); ignored with ``init_from``,
            which takes the architecture from the loaded weights.
        mode: ``e2e`` (TTT-E2E, meta-learning), ``swa`` or ``full`` (the baselines).
        ttt: run the inner loop while training (``e2e`` only); ``False`` trains the E2E
            architecture in pretrain mode (``tttlm train --mode e2e --no-ttt``).
        model_overrides: fields of :class:`tttlm.config.TTTConfig` to change (window, ...).
        init_from: a model folder or a run folder to load weights from (context extension);
            optimizer, schedule and data position start fresh.
        data: a prepared data folder (``tttlm data prepare``).
        train_split: split of ``data`` to train on.
        val_split: split to evaluate on (``""``: no evaluation).
        seq_len: tokens per training sequence.
        batch_size: sequences per optimizer step, over all processes together.
        micro_batch_size: sequences per forward pass and process (0: the whole per-process
            batch at once); the rest is gradient accumulation. ``"auto"``: on a GPU, the
            largest divisor of the per-process batch whose step fits, measured at the start
            and recorded in the run's config (:mod:`tttlm.train.micro_batch`); 0 on a CPU.
        steps: optimizer steps of the whole run (the schedule's length).
        lr: peak outer learning rate (AdamW).
        base_lr_scale: multiplier of ``lr`` for the weights an ``e2e`` model shares with a
            full-attention model (all but the prime MLPs, their norms and a learned inner-LR
            scale); ``0`` freezes them (no gradient, no AdamW state). For meta-fine-tuning a
            converted pretrained model (preset ``ttt-finetune``: 0.1).
        end_lr: learning rate at the last step (cosine decay target).
        warmup_frac: fraction of ``steps`` of linear LR warmup.
        weight_decay: AdamW decoupled weight decay, on every parameter (official recipe).
        beta1: AdamW β1.
        beta2: AdamW β2.
        eps: AdamW ε.
        grad_clip: global L2 norm the outer gradient is clipped to (0: no clipping).
        max_nonfinite_steps: a step whose loss or gradient norm is NaN or infinite is skipped
            (no optimizer update; the step counter, the schedule and the data position still
            advance, so a bad batch is not retried); after this many such steps in a row the
            run stops with an error naming the last good checkpoint.
        inner_lr: η after warmup (``None``: the model config's, 1 in every preset).
        inner_lr_warmup_frac: fraction of ``steps`` over which η ramps from the model's
            ``inner_lr_init`` to ``inner_lr`` (0: η fixed, as in context extension).
        grad_mode: ``exact`` (second order through the inner steps) or ``first_order``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: parameter dtype: ``float32``, or ``float64`` for exactness tests.
        autocast: ``auto`` (bf16 autocast on CUDA, none on CPU or with float64 weights),
            ``bf16`` or ``none``.
        activation_checkpointing: recompute activations in the backward pass (TTT chunks and
            whole-sequence blocks) to save memory.
        lean_head: recompute the output head's ``[tokens, vocab]`` logits in the backward passes
            instead of keeping them (``TTTForCausalLM.lean_head``): about 13 GiB less per 8K
            sequence at a 128K vocabulary, about 30% more time per e2e step at 125m (H100,
            benchmarks/results/meta_step_125m_8k*); turn it off when memory allows.
        compile: ``torch.compile`` the code around attention in the whole-sequence blocks
            (prefix blocks, baselines) and in the TTT chunks of evaluation; meta-gradients
            differentiate the chunks twice, which compiled code does not support: eager there.
        step_mode: ``auto`` (``graph`` on one CUDA device without activation checkpointing,
            else ``eager``, or ``compiled`` with ``compile``),
            ``eager``, ``compiled`` (an eager step through compiled blocks, as ``compile``) or
            ``graph`` (the whole step, optimizer included, captured once as a CUDA graph and
            replayed; CUDA only, one process; blocks compiled inside it with ``compile``).
        recall_fraction: fraction of training sequences in which a span repeating an
            earlier one from beyond the window gets that passage quoted right before it
            (:mod:`tttlm.memory.training`), so that the model learns to use the retrieval
            memory's quotes (0: off; windowed models only).
        recall_budget: tokens of such a quote, separators included (default: a quarter of
            the window, as the recall policy).
        parallel: ``auto``, ``ddp`` or ``fsdp`` under ``torchrun``.
        seed: seed of model init and of the data order.
        num_threads: CPU threads for torch (0: torch's default).
        log_every: steps between metric lines.
        eval_every: steps between evaluations (0: only at the end).
        eval_sequences: validation sequences per evaluation (0: the whole split).
        save_every: steps between checkpoints (0: only at the end and on Ctrl-C). No
            checkpoint is saved right after a skipped (non-finite) step, nor ever one whose
            weights are not finite.
        keep_checkpoints: most recent checkpoints kept on disk.
        out_dir: run folder (config, metrics, checkpoints, final model).
        tensorboard: also write TensorBoard events to ``out_dir/tensorboard``: ``auto`` (when
            the ``tensorboard`` package is installed), ``true`` (says so once when it is not)
            or ``false``.
        progress: show a progress bar.
    """

    model: str = "tiny"
    mode: Variant = Variant.E2E
    ttt: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    data: str = ""
    train_split: str = "train"
    val_split: str = "val"
    seq_len: int = 256
    batch_size: int = 8
    micro_batch_size: int | str = 0
    steps: int = 100
    lr: float = 3e-3
    base_lr_scale: float = 1.0
    end_lr: float = 1e-5
    warmup_frac: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 3
    inner_lr: float | None = None
    inner_lr_warmup_frac: float = 0.1
    grad_mode: GradMode = GradMode.EXACT
    device: str = "auto"
    dtype: str = "float32"
    autocast: str = "auto"
    activation_checkpointing: bool = False
    lean_head: bool = True
    compile: bool = False
    step_mode: StepMode = StepMode.AUTO
    recall_fraction: float = 0.0
    recall_budget: int | None = None
    parallel: Parallel = Parallel.AUTO
    seed: int = 0
    num_threads: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_sequences: int = 16
    save_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    tensorboard: bool | str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for name, kind in (("mode", Variant), ("grad_mode", GradMode), ("parallel", Parallel),
                           ("step_mode", StepMode)):
            value = getattr(self, name)
            try:
                setattr(self, name, kind(value))
            except ValueError:
                choices = ", ".join(v.value for v in kind)
                raise ValueError(f"{name}={value!r} is not known; use one of {choices}") from None
        if self.mode is not Variant.E2E:
            # The baselines have no fast weights: there is no inner loop to switch on.
            self.ttt = False
        self.tensorboard = _tensorboard_setting(self.tensorboard)
        self._validate()

    def _validate(self) -> None:
        self._check_types()
        for name in ("seq_len", "batch_size", "steps", "max_nonfinite_steps"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.micro_batch_size, str) and self.micro_batch_size != "auto":
            raise ValueError(f"micro_batch_size={self.micro_batch_size!r} must be an integer "
                             "or 'auto'")
        for name in ("micro_batch_size", "log_every", "eval_every", "eval_sequences",
                     "save_every", "num_threads"):
            if isinstance(getattr(self, name), str):
                continue
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints} must be >= 1 so that a "
                             "run can be resumed")
        for name in ("warmup_frac", "inner_lr_warmup_frac"):
            check_number(name, getattr(self, name), minimum=0.0, maximum=1.0,
                         hint="a fraction of the steps, in [0, 1]")
        check_number("lr", self.lr, minimum=0.0, strict=True,
                     hint="the peak learning rate is positive (3e-3 in the presets)")
        check_number("base_lr_scale", self.base_lr_scale, minimum=0.0, maximum=1.0,
                     hint="a multiplier of lr for the weights TTT-E2E shares with its "
                     "full-attention origin, in [0, 1] (0: frozen)")
        if self.base_lr_scale < 1.0 and not (self.mode is Variant.E2E and self.ttt):
            raise ValueError(f"base_lr_scale={self.base_lr_scale} separates the TTT weights "
                             "(prime MLPs) from the rest, so it needs mode=e2e with TTT on; "
                             "use base_lr_scale=1")
        check_number("end_lr", self.end_lr, minimum=0.0, maximum=self.lr,
                     hint=f"need 0 <= end_lr <= lr={self.lr}")
        check_number("grad_clip", self.grad_clip, minimum=0.0,
                     hint="the gradient norm clip is >= 0 (0: no clipping, 1 in the presets)")
        check_number("weight_decay", self.weight_decay, minimum=0.0,
                     hint="AdamW weight decay is >= 0 (0.1 in the presets)")
        for name in ("beta1", "beta2"):
            check_number(name, getattr(self, name), minimum=0.0,
                         hint="AdamW betas are in [0, 1) (0.9 and 0.95 in the presets)")
            if getattr(self, name) >= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be < 1; AdamW betas are "
                                 "in [0, 1) (0.9 and 0.95 in the presets)")
        check_number("eps", self.eps, minimum=0.0, strict=True,
                     hint="AdamW epsilon is a small positive number such as 1e-8")
        check_number("recall_fraction", self.recall_fraction, minimum=0.0, maximum=1.0,
                     hint="the fraction of sequences given recalled passages, in [0, 1]")
        if self.recall_fraction > 0 and self.mode is Variant.FULL:
            raise ValueError("recall_fraction needs a windowed model (e2e or swa): with full "
                             "attention nothing leaves the window to recall")
        if self.recall_budget is not None and self.recall_budget < 10:
            raise ValueError(f"recall_budget={self.recall_budget} must be >= 10 (two "
                             "separators and a passage of at least 8 tokens)")
        if self.inner_lr is not None:
            check_number("inner_lr", self.inner_lr, minimum=0.0, maximum=MAX_INNER_LR,
                         hint="the official η is 1")
        if (isinstance(self.micro_batch_size, int) and self.micro_batch_size
                and self.batch_size % self.micro_batch_size):
            raise ValueError(f"micro_batch_size={self.micro_batch_size} does not divide "
                             f"batch_size={self.batch_size}")
        check_device_name(self.device)
        if self.step_mode is StepMode.EAGER and self.compile:
            raise ValueError("step_mode=eager contradicts compile=true; use step_mode=compiled, "
                             "or compile=false")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r}: use float32 (bf16 comes from autocast) or "
                             "float64")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"autocast={self.autocast!r}: use {', '.join(AUTOCAST_CHOICES)}")
        if self.init_from is None and self.model not in MODEL_PRESETS:
            raise ValueError(f"model={self.model!r} is not a preset; use one of "
                             f"{', '.join(MODEL_PRESETS)} or init_from=PATH")
        known = {f.name for f in dataclasses.fields(TTTConfig)} - {"variant"}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"model overrides {unknown} are not TTTConfig fields; known: "
                             f"{sorted(known)}")
        for name, value in self.model_overrides.items():
            # Numbers only here (NaN, infinity, text); ranges when the model config is built.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"model.{name}={value!r} must be a finite number (not NaN or "
                                 "infinity)")

    def _check_types(self) -> None:
        """Every field has its declared type (config files and the library are not parsed by
        :func:`parse_value`): a clear message instead of a ``TypeError`` later. Ranges and
        NaN/infinity are checked field by field in :meth:`_validate`."""
        hints = _field_types()
        for f in dataclasses.fields(self):
            kind, value = hints[f.name], getattr(self, f.name)
            union = typing.get_origin(kind) in (typing.Union, types.UnionType)
            options = typing.get_args(kind) if union else (kind,)
            if value is None and type(None) in options:
                continue
            kinds = [a for a in options if a is not type(None)]
            if not any(_is_a(value, k) for k in kinds):
                want = " or ".join(_TYPE_WORDS.get(typing.get_origin(k) or k, str(k))
                                   for k in kinds)
                raise ValueError(f"{f.name}={value!r} must be {want}")

    # ----------------------------------------------------------------------------- derived
    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_frac * self.steps)

    @property
    def inner_lr_warmup_steps(self) -> int:
        return round(self.inner_lr_warmup_frac * self.steps)

    def model_config(self, base: TTTConfig | None = None) -> TTTConfig:
        """The model config: ``base`` (loaded weights) or the preset, plus overrides and the
        trainer's inner-LR schedule."""
        fields = dict(self.model_overrides)
        fields["inner_lr_warmup_steps"] = self.inner_lr_warmup_steps
        if self.inner_lr is not None:
            fields["inner_lr"] = self.inner_lr
        if base is not None:
            if base.variant is not self.mode:
                raise ValueError(f"init_from holds a {base.variant.value!r} model but "
                                 f"mode={self.mode.value!r}; set mode to match")
            return TTTConfig.from_dict({**base.to_dict(), **fields})
        return TTTConfig.from_preset(self.model, self.mode, **fields)

    # ------------------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("mode", "grad_mode", "parallel", "step_mode"):
            data[name] = getattr(self, name).value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: "
                             f"{sorted(known)}")
        return cls(**data)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_json() + "\n")
        return path


_TYPE_WORDS = {dict: "a JSON object", float: "a number", int: "an integer", bool: "true or false",
               str: "a string"}


def _is_a(value: Any, kind: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(kind) is dict:
        return isinstance(value, dict)
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True


def _tensorboard_setting(value: Any) -> bool | str:
    """``auto``, ``True`` or ``False`` from a bool or its text."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered == "auto":
            return "auto"
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"tensorboard={value!r}: use auto (on when the tensorboard package is "
                     "installed), true or false")


# --------------------------------------------------------------------------------- presets
# Official recipes (METHOD.md §4) and small settings that run on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: tiny model, tiny sequences; for smoke tests and debugging.
    "debug": dict(model="tiny", seq_len=128, batch_size=4, steps=20, lr=3e-3, log_every=5,
                  eval_every=10, eval_sequences=4, keep_checkpoints=2),
    # Official pretraining at 8K, batch 64 (METHOD.md §4).
    # 125m: four 8K sequences fit an 80 GB card without activation checkpointing (54 GiB,
    # benchmarks/results/train_step_125m_8k.md), twice as fast as checkpointing one.
    "125m-8k": dict(model="125m", seq_len=8192, batch_size=64, micro_batch_size=4, steps=4800,
                    lr=3e-3, eval_every=500, save_every=500, log_every=10),
    "760m-8k": dict(model="760m", seq_len=8192, batch_size=64, micro_batch_size=1, steps=4800,
                    lr=1.25e-3, eval_every=500, save_every=500, log_every=10,
                    activation_checkpointing=True, parallel="fsdp"),
    "3b-8k": dict(model="3b", seq_len=8192, batch_size=64, micro_batch_size=1, steps=4800,
                  lr=8e-4, eval_every=500, save_every=250, log_every=10,
                  activation_checkpointing=True, parallel="fsdp"),
    # Context extension on books (use with --init-from): η fixed at 1, LR 4e-4, batch 32.
    # Meta-fine-tuning a pretrained model made TTT-E2E (tttlm convert hf SRC DST --to e2e
    # --window 1024): its prime MLPs start as no-ops (zero output projection) and learn at lr,
    # the pretrained weights at a tenth of it, so that the model first learns to use its fast
    # weights before its language modelling drifts; the inner LR η ramps from the model's
    # inner_lr_init over the first fifth (an untrained prime with η = 1 at once would write
    # noise into the fast weights); sequences 8 windows long, so that most of every sequence is
    # read beyond the window, where TTT has to carry the context.
    "ttt-finetune": dict(seq_len=8192, batch_size=16, micro_batch_size=1, steps=500, lr=1e-3,
                         base_lr_scale=0.1, end_lr=1e-5, warmup_frac=0.05,
                         inner_lr_warmup_frac=0.2, eval_every=100, save_every=100),
    "books-32k": dict(seq_len=32768, batch_size=32, micro_batch_size=1, steps=300, lr=4e-4,
                      inner_lr_warmup_frac=0.0, eval_every=100, save_every=100,
                      activation_checkpointing=True),
}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def parse_value(key: str, text: str) -> Any:
    """Turn the text of ``--set key=text`` into the type of field ``key``.

    Booleans take true/false/1/0/yes/no/on/off; ``none``/``null`` clears an optional field;
    ``model.*`` values are parsed as JSON when they can be (numbers, booleans), else kept as
    strings.
    """
    if key.startswith("model."):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
        try:
            return float(text)  # nan, inf, 1e-3 without JSON's spelling
        except ValueError:
            return text
    types = _field_types()
    if key not in types:
        raise ValueError(f"--set {key}=...: unknown key; known keys: {sorted(types)} "
                         "and model.<TTTConfig field>")
    kind = types[key]
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional and text.lower() in ("none", "null", ""):
        return None
    if optional:
        kind = next(a for a in args if a is not type(None))
    if set(args) == {int, str}:  # a number, or a word (micro_batch_size=auto)
        try:
            return int(text)
        except ValueError:
            return text
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={text}: expected a boolean (true/false)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--set {key}={text}: expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--set {key}={text}: expected a number") from None
    if typing.get_origin(kind) is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--set {key}={text}: expected a JSON object ({err.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"--set {key}={text}: expected a JSON object")
        return value
    return text


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=1e-3", "model.window=256"]`` → ``{"lr": 0.001, "model_overrides": {...}}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value (e.g. --set lr=1e-3)")
        key = key.replace("-", "_") if not key.startswith("model.") else key
        value = parse_value(key, text.strip())
        if key.startswith("model."):
            out.setdefault("model_overrides", {})[key[len("model."):]] = value
        elif key == "model_overrides":
            out["model_overrides"] = {**out.get("model_overrides", {}), **value}
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if key == "model_overrides" and isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON training config (``configs/*.json`` or a run's ``train_config.json``)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {file} does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object of training settings")
    data.pop("_comment", None)
    return data


# Presets that continue a model: without --init-from they would fine-tune random weights.
PRESETS_NEEDING_INIT = ("ttt-finetune",)


def resolve_config(preset: str | None = None, config_file: str | os.PathLike[str] | None = None,
                   overrides: dict[str, Any] | None = None,
                   sets: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig` from a preset, a file, explicit overrides, then ``--set``."""
    data: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"training preset {preset!r} is not known; use one of "
                             f"{', '.join(PRESETS)}")
        data = _merge(data, PRESETS[preset])
    if config_file is not None:
        data = _merge(data, load_config_file(config_file))
    data = _merge(data, overrides or {})
    data = _merge(data, parse_overrides(sets))
    if preset in PRESETS_NEEDING_INIT and not data.get("init_from"):
        raise ValueError(f"preset {preset} continues a trained model; give it with "
                         "--init-from MODEL_OR_RUN (for a pretrained LLM: tttlm convert hf SRC "
                         "DST --to e2e, then --init-from DST)")
    return TrainConfig.from_dict(data)
