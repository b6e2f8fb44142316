"""``tttlm train`` and ``tttlm quickstart``: parse arguments, build a config, call the library."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tttlm.train.config import CONFIG_FILE, PRESETS, resolve_config

_EXAMPLES = """\
examples:
  tttlm train --preset debug --data data/books --out runs/debug
  tttlm train --preset 125m-8k --data data/dclm --out runs/125m-e2e
  tttlm train --preset 125m-8k --mode full --data data/dclm --out runs/125m-full
  tttlm train --mode e2e --no-ttt --config configs/tiny_books.json --set steps=2000
  tttlm train --preset 125m-8k --set step_mode=graph ...  # the step as one CUDA graph
  tttlm train --preset books-32k --init-from runs/125m-e2e --data data/books --out runs/125m-32k
  tttlm train --out runs/125m-e2e --resume          # continue where it stopped
  tttlm train --out runs/125m-e2e --resume=auto ... # resume if there is a checkpoint, else start
  tttlm train --out runs/125m-e2e --overwrite ...   # delete the run in runs/125m-e2e, start anew
  torchrun --nproc-per-node 8 -m tttlm.cli train --preset 125m-8k --data ... --out ...
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train a TTT-E2E model or a baseline",
        description="Train a model. The config is a preset, then --config FILE, then the "
                    "flags below, then --set key=value overrides (model fields as "
                    "model.<field>=value); the resolved config is saved in the run folder.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="training preset")
    p.add_argument("--config", metavar="FILE", help="JSON training config")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable), e.g. --set lr=1e-3 "
                        "--set model.window=256")
    p.add_argument("--mode", choices=("e2e", "swa", "full", "hybrid", "ttt_kvb",
                                      "gated_deltanet", "mamba2"),
                   help="model variant (hybrid, ttt_kvb, gated_deltanet, mamba2: SWA with a "
                        "full-attention, TTT-KVB, Gated DeltaNet or Mamba 2 block in every 6)")
    p.add_argument("--no-ttt", dest="ttt", action="store_false", default=None,
                   help="train the e2e architecture without the inner loop (pretrain mode)")
    p.add_argument("--model", help="model size preset (tiny, 125m, 350m, 760m, 1b, 3b)")
    p.add_argument("--data", help="prepared data folder (tttlm data prepare)")
    p.add_argument("--out", dest="out_dir", help="run folder")
    p.add_argument("--init-from", metavar="RUN_OR_DIR",
                   help="load weights only (context extension), from a model or run folder")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per step over all processes")
    p.add_argument("--micro-batch-size", type=_micro_batch, metavar="N|auto",
                   help="sequences per forward pass and process (0: all); auto: the largest "
                        "that fits the GPU, measured at the start")
    p.add_argument("--steps", type=int, help="total optimizer steps (the schedule's length)")
    p.add_argument("--lr", type=float)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint of --out (an error when there is "
                        "none), or from CHECKPOINT (a checkpoint or run folder); --resume=auto "
                        "resumes when there is a checkpoint and starts a new run when there is "
                        "none (for job schedulers that requeue)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run that --out holds (config, metrics, checkpoints, final "
                        "model) and start a new one; without it such a folder is refused")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop (with a checkpoint) after this step; the schedule still spans "
                        "--steps")
    p.set_defaults(func=run_train)

    q = subparsers.add_parser(
        "quickstart", help="one-command first experiment: e2e vs swa vs full on built-in books",
        description="Prepare the built-in books, train a tiny e2e model and its swa and full "
                    "baselines on the same tokens, evaluate loss by position on held-out books, "
                    "and write report.md, report.json and loss_by_position.png to --out.")
    q.add_argument("--out", default="quickstart", help="output folder (default: quickstart)")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda")
    q.add_argument("--size", choices=("auto", "cpu", "gpu", "tiny"), default="auto",
                   help="settings: cpu (~10 min on 2 cores), gpu (larger), tiny (seconds, for "
                        "tests); auto picks gpu or cpu from the device")
    q.add_argument("--steps", type=int, help="override the number of training steps")
    q.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    q.add_argument("--data", help="use this prepared data folder instead of the built-in books")
    q.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (for logs)")
    q.set_defaults(func=run_quickstart)


def _micro_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of sequences; give N or "
                                         "'auto'") from None


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("mode", "ttt", "model", "data", "out_dir", "init_from", "seq_len", "batch_size",
             "micro_batch_size", "steps", "lr", "device")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _saved_config(args: argparse.Namespace) -> Path | None:
    """The ``train_config.json`` a resumed run starts from: the run folder's, or that of the
    run the given checkpoint belongs to."""
    candidates = []
    if args.out_dir:
        candidates.append(Path(args.out_dir) / CONFIG_FILE)
    if isinstance(args.resume, str) and args.resume != "auto":
        path = Path(args.resume)
        candidates += [path / CONFIG_FILE, path.parent.parent / CONFIG_FILE]
    return next((c for c in candidates if c.is_file()), None)


def run_train(args: argparse.Namespace) -> int:
    # Errors (bad settings, a folder owned by another run, a full disk) reach tttlm.cli.main,
    # which prints them as one line.
    from tttlm.train.trainer import Trainer

    config_file = args.config
    if args.resume is not False and config_file is None and args.preset is None:
        # Resuming a run: start from the config it was started with.
        config_file = _saved_config(args)
    config = resolve_config(args.preset, config_file, _flag_overrides(args), args.sets)
    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite)
    summary = trainer.train(until=args.stop_at)
    if trainer.dist.is_main:
        print(json.dumps(summary))
    return 130 if summary["interrupted"] else 0


def run_quickstart(args: argparse.Namespace) -> int:
    from tttlm.train.quickstart import run_quickstart as run

    run(out_dir=args.out, device=args.device, size=args.size, steps=args.steps,
        threads=args.threads, data=args.data, progress=args.progress)
    return 0
