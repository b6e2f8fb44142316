"""A small same-tokens comparison of every model variant: the same data, steps and seed for all,
then loss by position on held-out books.

    PYTHONPATH=src python benchmarks/variants_small.py --out benchmarks/results/variants_small_cpu
    PYTHONPATH=src python benchmarks/variants_small.py --size gpu --device cuda \
        --work /tmp/variants-small --out bench-results/variants_small_gpu

``--size cpu``: the quickstart's CPU setting (4 blocks, width 128, window 256, chunk 64, 100
steps of 4 x 1024 tokens of the shipped books, a 2K BPE). Four blocks cannot hold the paper's
5:1 hybrids, so there the mixed variants put their full-attention / recurrent block at every
second block (1:1, ``global_every=2``). ``--size gpu``: the quickstart's GPU setting (width 512,
window 512, chunk 128, 16 x 4096 tokens a step, a 4K BPE) with 12 blocks, so the mixed
variants are the paper's 5:1 (``global_every=6``: blocks 5 and 11), and 3 TTT blocks for e2e.
It checks that the seven systems train and evaluate in one harness and shows their loss
beyond the window; the numbers are far from the paper's scale. A variant whose final
checkpoint is already in ``--work`` is not trained again (a cut run continues). Writes OUT.json
and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tttlm.data import prepare_builtin
from tttlm.eval import WindowMode, evaluate_loss, load_corpus, load_model
from tttlm.files import atomic_write_text
from tttlm.train import checkpoint as ckpt
from tttlm.train.config import TrainConfig
from tttlm.train.quickstart import SIZES, model_overrides
from tttlm.train.trainer import Trainer

VARIANTS = ("e2e", "swa", "full", "hybrid", "ttt_kvb", "gated_deltanet", "mamba2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("variants-small"))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: 4 blocks of width 128, 1:1 mixes; gpu: 12 blocks of width 512, 5:1")
    p.add_argument("--out", type=Path, required=True, help="report path without suffix")
    args = p.parse_args()
    if args.size == "gpu":
        cfg, every = dataclasses.replace(SIZES["gpu"], num_layers=12, num_ttt_layers=3), 6
    else:
        cfg, every = SIZES["cpu"], 2
    steps = args.steps or cfg.steps
    began = time.perf_counter()
    # each setting its own folder: data (the sizes differ in tokenizer), runs and rows
    base = args.work / f"{args.size}-{steps}steps"
    data = base / "data"
    if not (data / "meta.json").is_file():
        prepare_builtin(data, cfg.tokenizer, overwrite=True, progress=False)
    rows: dict[str, dict[str, Any]] = {}
    done_file = base / "rows.json"  # the variants an earlier, cut run trained
    earlier = json.loads(done_file.read_text()) if done_file.is_file() else {}
    for mode in args.variants:
        if mode in earlier and (base / "runs" / mode / ckpt.FINAL).exists():
            rows[mode] = earlier[mode]
            continue
        arch = model_overrides(cfg, "e2e" if mode == "e2e" else "full")
        if mode in ("hybrid", "ttt_kvb", "gated_deltanet", "mamba2"):
            arch["global_every"] = every
        config = TrainConfig(model="tiny", mode=mode, model_overrides=arch, data=str(data),
                             out_dir=str(base / "runs" / mode), seq_len=cfg.seq_len,
                             batch_size=cfg.batch_size, steps=steps, lr=cfg.lr,
                             device=args.device,
                             log_every=max(1, steps // 10), eval_every=0, eval_sequences=0,
                             val_split="", save_every=0, keep_checkpoints=1, progress=False,
                             tensorboard=False)
        t0 = time.perf_counter()
        trainer = Trainer(config, overwrite=True)
        summary = trainer.train()
        rows[mode] = {"variant": mode, "params": trainer.module.num_parameters(),
                      "train_loss": round(summary["loss"], 4),
                      "train_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(rows[mode]), flush=True)
        earlier[mode] = rows[mode]  # (kept with the rows of runs that trained other variants)
        atomic_write_text(done_file, json.dumps(earlier, indent=2) + "\n")
        # A graphed step holds its CUDA-graph memory pool until the graph object is collected;
        # without this the next variant's step ran out of memory on an H200.
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.device(args.device)
    models = [load_model(base / "runs" / mode / ckpt.FINAL, device=device, label=mode)
              for mode in args.variants]
    evaluation = evaluate_loss(models, load_corpus(data, split="val"), [cfg.seq_len],
                               mode=WindowMode.STREAM, max_sequences=cfg.eval_sequences,
                               batch_size=cfg.batch_size, device=device,
                               curve_points=cfg.seq_len, progress=False)
    W = cfg.window
    for mode in args.variants:
        entry = evaluation["results"][mode][str(cfg.seq_len)]["curve"]["mean_nll"]
        curve = np.asarray([np.nan if v is None else v for v in entry], dtype=np.float64)
        rows[mode].update(
            eval_loss=round(float(np.nanmean(curve)), 4),
            within_window=round(float(np.nanmean(curve[:W])), 4),
            beyond_window=round(float(np.nanmean(curve[W:])), 4),
            **{f"loss_{a}_{a + W}": round(float(np.nanmean(curve[a:a + W])), 4)
               for a in range(0, cfg.seq_len, W)})
    tokens = steps * cfg.batch_size * cfg.seq_len
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    env = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {gpu}",
           "python": platform.python_version(), "torch": torch.__version__,
           # (the scratch folder as $WORK: no machine's paths in reports)
           "command": ("python benchmarks/variants_small.py " + shlex.join(sys.argv[1:]))
           .replace(str(args.work), "$WORK"),
           "train_tokens_per_variant": tokens, "wall_s": round(time.perf_counter() - began)}
    report = {"title": f"All variants, small-scale, same tokens ({device.type})", "env": env,
              "settings": {"hidden": cfg.hidden_size, "blocks": cfg.num_layers,
                           "window": W, "chunk": cfg.chunk_size, "seq_len": cfg.seq_len,
                           "steps": steps, "batch": cfg.batch_size, "lr": cfg.lr,
                           "tokenizer": cfg.tokenizer, "global_every": every,
                           "eval_sequences": cfg.eval_sequences},
              "rows": list(rows.values())}
    cols = ["variant", "params", "train_loss", "eval_loss", "within_window", "beyond_window",
            *(f"loss_{a}_{a + W}" for a in range(0, cfg.seq_len, W)), "train_s"]
    lines = [f"# {report['title']}", "", *(f"- {k}: `{v}`" for k, v in env.items()), "",
             f"Settings: {report['settings']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows.values()]
    mix = ("1:1 (four blocks cannot hold 5:1)" if every == 2
           else f"{every - 1}:1 (one block in every {every})")
    lines += ["", f"Small-scale: a {cfg.num_layers}-block, width-{cfg.hidden_size} model, "
              f"{tokens:,} training tokens per variant; the mixed variants at {mix}. Loss by "
              "position on "
              f"{cfg.eval_sequences} held-out windows of {cfg.seq_len} tokens (the quickstart's "
              f"evaluation); positions >= {W} are beyond the window."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
