"""``tttlm quickstart``: TTT-E2E and its two baselines on the built-in books, end to end.

Prepares the data, trains ``e2e``, ``swa`` and ``full`` with the same steps, batch, sequence
length and token order, measures loss by position on held-out books (:mod:`tttlm.eval`, as
``tttlm eval loss --windows stream`` does on the three final models), and writes
``report.md``, ``report.json`` and ``loss_by_position.png``. Window and chunk are scaled down
(k = 256, b = 64 on a CPU) so that the long-context regime starts after a few hundred tokens.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlm.data import DataError, prepare_builtin, read_meta
from tttlm.devices import describe_device, resolve_device
from tttlm.eval import (
    RepeatSettings,
    WindowMode,
    coarsen_curves,
    default_distances,
    evaluate_loss,
    evaluate_repeat,
    load_corpus,
    load_model,
    plot_loss_by_position,
    plot_repeat,
)
from tttlm.train import checkpoint as ckpt
from tttlm.train.config import TrainConfig
from tttlm.train.report import PLOT_PNG, REPEAT_PNG, write_report
from tttlm.train.trainer import Trainer

MODES = ("e2e", "swa", "full")


@dataclass(frozen=True)
class QuickstartSize:
    """One size of the quickstart experiment."""

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_full: int  # MLP width of swa/full
    mlp_e2e: int  # MLP width of e2e: 4 MLPs + 1 prime MLP ≈ the baselines' 4 MLPs
    num_ttt_layers: int
    window: int
    chunk_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    eval_sequences: int
    bucket: int  # positions per point of the plotted curve
    tokenizer: str  # BPE trained on the train books; the output head's size is its vocabulary
    repeat_samples: int = 4  # sequences per distance of the repeated-passage panel


SIZES: dict[str, QuickstartSize] = {
    # ~1.3M parameters, 4K tokens a step: 7.4 minutes in all (data included) on 2 busy CPU
    # cores, measured. A 2K vocabulary because on a CPU the tied output
    # head dominates the e2e step: the inner loop differentiates it twice per chunk.
    "cpu": QuickstartSize(hidden_size=128, num_layers=4, num_heads=4, mlp_full=512, mlp_e2e=416,
                          num_ttt_layers=1, window=256, chunk_size=64, seq_len=1024,
                          batch_size=4, steps=100, lr=3e-3, eval_sequences=48, bucket=64,
                          tokenizer="train:2048"),
    # ~28M parameters (vocabulary 4096), 64K tokens a step, ~20M tokens in all. Not timed on a
    # GPU yet: the 125m e2e step ran at 14K tokens/s on an H100, this model is ~6x smaller.
    "gpu": QuickstartSize(hidden_size=512, num_layers=8, num_heads=8, mlp_full=1536,
                          mlp_e2e=1280, num_ttt_layers=2, window=512, chunk_size=128,
                          seq_len=4096, batch_size=16, steps=300, lr=2e-3, eval_sequences=64,
                          bucket=128, tokenizer="train:4096"),
    # Seconds: for tests of the pipeline, not for results.
    "tiny": QuickstartSize(hidden_size=32, num_layers=4, num_heads=2, mlp_full=64, mlp_e2e=48,
                           num_ttt_layers=1, window=32, chunk_size=16, seq_len=96,
                           batch_size=2, steps=3, lr=3e-3, eval_sequences=2, bucket=16,
                           tokenizer="train:512"),
}


def model_overrides(size: QuickstartSize, mode: str) -> dict[str, Any]:
    arch: dict[str, Any] = dict(
        hidden_size=size.hidden_size, num_layers=size.num_layers, num_heads=size.num_heads,
        intermediate_size=size.mlp_e2e if mode == "e2e" else size.mlp_full,
        window=size.window, chunk_size=size.chunk_size)
    if mode == "e2e":
        arch["num_ttt_layers"] = size.num_ttt_layers
    return arch


def run_quickstart(out_dir: str | os.PathLike[str] = "quickstart", *, device: str = "auto",
                   size: str = "auto", steps: int | None = None, threads: int = 0,
                   data: str | os.PathLike[str] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run the whole experiment; returns the report (also written to ``out_dir``)."""
    start = time.perf_counter()
    out = Path(out_dir)
    dev = resolve_device(device)
    if size == "auto":
        size = "gpu" if dev.type == "cuda" else "cpu"
    if size not in SIZES:
        raise ValueError(f"quickstart size {size!r} is not known; use one of {', '.join(SIZES)}")
    cfg = SIZES[size]
    n_steps = steps if steps is not None else cfg.steps
    if threads:
        torch.set_num_threads(threads)

    if data is None:
        data_dir = out / "data"
        try:
            ready = read_meta(data_dir)["tokenizer"]["spec"] == cfg.tokenizer
        except DataError:
            ready = False
        if ready:
            print(f"[1/5] reusing prepared books in {data_dir}", flush=True)
        else:
            print(f"[1/5] preparing the built-in books in {data_dir} ...", flush=True)
            prepare_builtin(data_dir, cfg.tokenizer, overwrite=True, progress=progress)
    else:
        data_dir = Path(data)
        read_meta(data_dir)
    prep_time = time.perf_counter() - start

    results: dict[str, Any] = {}
    model_arch: dict[str, Any] = {}
    for i, mode in enumerate(MODES):
        print(f"[{i + 2}/5] training {mode} ({n_steps} steps of {cfg.batch_size} x "
              f"{cfg.seq_len} tokens) ...", flush=True)
        config = TrainConfig(
            model="tiny", mode=mode, model_overrides=model_overrides(cfg, mode),
            data=str(data_dir), out_dir=str(out / "runs" / mode), seq_len=cfg.seq_len,
            batch_size=cfg.batch_size, steps=n_steps, lr=cfg.lr, device=device,
            log_every=max(1, n_steps // 20), eval_every=0, eval_sequences=0, val_split="",
            save_every=0, keep_checkpoints=1, progress=progress, tensorboard=False,
            num_threads=threads)
        t0 = time.perf_counter()
        # A rerun of the quickstart repeats the experiment: its own runs are replaced.
        trainer = Trainer(config, overwrite=True)
        summary = trainer.train()
        train_time = time.perf_counter() - t0
        if mode == "e2e":
            model_arch = {k: v for k, v in trainer.model_config.to_dict().items() if k in (
                "hidden_size", "num_layers", "num_heads", "vocab_size", "num_ttt_layers")}
        results[mode] = {
            "params": trainer.module.num_parameters(),
            "final_train_loss": summary["loss"],
            "train_time_s": train_time,
            "run_dir": str(out / "runs" / mode),
        }
        del trainer

    # Loss by position of the three final models, as `tttlm eval loss` measures it: windows of
    # the held-out stream laid out as in training, spread over all of it.
    print(f"[5/5] loss by position on {cfg.eval_sequences} held-out windows ...", flush=True)
    models = [load_model(Path(results[mode]["run_dir"]) / ckpt.FINAL, device=dev, label=mode)
              for mode in MODES]
    evaluation = evaluate_loss(models, load_corpus(data_dir, split="val"), [cfg.seq_len],
                               mode=WindowMode.STREAM, max_sequences=cfg.eval_sequences,
                               batch_size=cfg.batch_size, device=dev,
                               curve_points=cfg.seq_len, progress=progress)
    for mode in MODES:
        entry = evaluation["results"][mode][str(cfg.seq_len)]
        curve = np.asarray(entry["curve"]["mean_nll"], dtype=np.float64)  # one point a position
        results[mode].update({
            "eval_loss": float(np.mean(curve)),
            "eval_loss_within_window": float(np.mean(curve[:cfg.window])),
            "eval_loss_beyond_window": float(np.mean(curve[cfg.window:])),
            "nll_by_position": [float(x) for x in curve],
        })
    plotted = plot_loss_by_position(coarsen_curves(evaluation, cfg.bucket),
                                    out / PLOT_PNG) is not None
    # The memory panel: a passage read twice, d tokens apart (`tttlm eval repeat`), with and
    # without retrieval.
    print("      and a passage read twice, from inside the window to 16x beyond it ...",
          flush=True)
    repeat = evaluate_repeat(
        models, load_corpus(data_dir, split="val"),
        RepeatSettings(distances=default_distances(cfg.window),
                       passage_len=min(64, cfg.window // 2), cue=8, lead=cfg.chunk_size,
                       samples=cfg.repeat_samples, rag=["off", "end"]),
        device=dev, progress=progress)
    repeat_plotted = plot_repeat(repeat, out / REPEAT_PNG) is not None
    argv = ["tttlm", "quickstart", "--out", str(out_dir)]
    if size != ("gpu" if dev.type == "cuda" else "cpu"):
        argv += ["--size", size]
    if steps is not None:
        argv += ["--steps", str(steps)]
    report: dict[str, Any] = {
        "settings": {
            "size": size, "steps": n_steps, "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "window": cfg.window, "chunk_size": cfg.chunk_size,
            "lr": cfg.lr, "train_tokens": n_steps * cfg.batch_size * cfg.seq_len,
            "model": model_arch, "mlp_width": {"e2e": cfg.mlp_e2e, "swa": cfg.mlp_full,
                                               "full": cfg.mlp_full},
            "data": str(data_dir),
        },
        "eval_sequences": evaluation["results"]["e2e"][str(cfg.seq_len)]["sequences"],
        "device": describe_device(dev),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "data_prep_time_s": prep_time,
        "wall_time_s": time.perf_counter() - start,
        "plot": plotted,
        "repeat": {"settings": repeat["settings"], "results": repeat["results"],
                   "notes": repeat["notes"], "plot": repeat_plotted},
        "command": shlex.join(argv),
        "models": results,
    }
    files = write_report(out, report)
    print(f"[done] wrote {files['md']}, {files['json']}"
          + (f" and {files['png']}" if plotted else " (no plot: matplotlib missing)"))
    for mode in MODES:
        m = results[mode]
        print(f"  {mode:>4}: held-out loss {m['eval_loss']:.3f} (positions < {cfg.window}: "
              f"{m['eval_loss_within_window']:.3f}, >= {cfg.window}: "
              f"{m['eval_loss_beyond_window']:.3f})")
    return report
