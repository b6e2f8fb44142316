"""``tttlm convert official|hf SRC DST``: the command-line front end of the converters."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tttlm.config import (
    OFFICIAL_BOS_ID,
    OFFICIAL_CHUNK_SIZE,
    OFFICIAL_EOS_ID,
    OFFICIAL_ROPE_THETA,
    OFFICIAL_WINDOW,
)
from tttlm.errors import UserError


def _run_official(args: argparse.Namespace) -> int:
    from tttlm.convert.official import convert_official

    def note(message: str) -> None:  # what the checkpoint cannot tell, and how to override it
        print(f"{getattr(args, 'command_prog', 'tttlm convert official')}: {message}",
              file=sys.stderr)

    try:
        out = convert_official(args.src, args.dst, window=args.window, chunk_size=args.chunk,
                               rope_theta=args.rope_theta, bos_token_id=args.bos_id,
                               eos_token_id=args.eos_id, variant=args.variant, log=note)
    except ImportError as err:  # an optional dependency (tensorstore for Orbax checkpoints)
        if (err.name or "").partition(".")[0] == "tttlm":
            raise  # tttlm itself is broken: a bug, not something the user can install
        raise UserError(str(err) or type(err).__name__) from None
    print(f"wrote {out}")
    return 0


def _run_hf(args: argparse.Namespace) -> int:
    from tttlm.convert.hf import convert_hf

    def note(message: str) -> None:
        print(f"{getattr(args, 'command_prog', 'tttlm convert hf')}: {message}", file=sys.stderr)

    out = convert_hf(args.src, args.dst, to=args.to, window=args.window, chunk_size=args.chunk,
                     num_ttt_layers=args.ttt_layers, prime_intermediate_size=args.prime_width,
                     seed=args.seed, bos_token_id=args.bos_id, log=note)
    print(f"wrote {out}")
    return 0


def _add_hf(sources: Any) -> None:
    hf = sources.add_parser(
        "hf", help="a transformers Llama/Qwen2/Qwen3 model (safetensors or GGUF)",
        description="Import a transformers LlamaForCausalLM, Qwen2ForCausalLM or "
                    "Qwen3ForCausalLM (SmolLM2 is a Llama) from a model folder (config.json + "
                    "*.safetensors) or a .gguf file (dequantised to float32 on import) into a "
                    "tttlm model folder with its tokenizer; needs pip install "
                    "'tttlm[convert-hf]'. --to full (default) computes the same logits as "
                    "transformers; --to swa switches to a sliding window (the matched "
                    "baseline); --to e2e also adds prime MLPs to the last blocks, with a zero "
                    "output projection so the outputs do not change before fine-tuning.")
    hf.add_argument("src", metavar="SRC", help="transformers model folder or .gguf file")
    hf.add_argument("dst", metavar="DST", help="output tttlm model directory")
    hf.add_argument("--to", choices=("full", "swa", "e2e"), default="full",
                    help="the model written (default full: the imported model as it is)")
    hf.add_argument("--window", type=int, default=None, metavar="K",
                    help="sliding-window size k (swa and e2e; required there)")
    hf.add_argument("--chunk", type=int, default=None, metavar="B",
                    help="TTT chunk size b (default K/8, the official ratio)")
    hf.add_argument("--ttt-layers", type=int, default=None, metavar="N",
                    help="blocks with a prime MLP, the last N (e2e; default: a quarter)")
    hf.add_argument("--prime-width", type=int, default=None, metavar="F",
                    help="prime MLP width (e2e; default: the MLP width)")
    hf.add_argument("--bos-id", type=int, default=None, metavar="N",
                    help="BOS id (document separator; default: the one tttlm's data pipeline "
                         "finds in the tokenizer, else the source config's)")
    hf.add_argument("--seed", type=int, default=0,
                    help="seed of the prime MLPs' random matrices (e2e)")
    hf.set_defaults(func=_run_hf)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``convert`` (with its ``official`` subcommand) on the top-level CLI's subparsers.

    Each leaf sets ``func`` to a handler ``(args) -> exit code`` so the top-level CLI stays a
    plain dispatcher.
    """
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints from other implementations",
        description="Convert checkpoints from other implementations into tttlm model directories.")
    sources = convert.add_subparsers(dest="convert_source", metavar="SOURCE", required=True)
    official = sources.add_parser(
        "official", help="an official TTT-E2E (JAX/Orbax) checkpoint",
        description="Convert an official TTT-E2E checkpoint (Orbax, <ckpt>/<step>/model_weights; "
                    "reading it needs pip install 'tttlm[orbax]') or a .npz of official arrays "
                    "into a tttlm model directory. Sizes come from the tensor shapes; options "
                    f"left out take the official values (k {OFFICIAL_WINDOW}, b "
                    f"{OFFICIAL_CHUNK_SIZE}, theta {OFFICIAL_ROPE_THETA:g}, Llama-3 BOS/EOS "
                    f"{OFFICIAL_BOS_ID}/{OFFICIAL_EOS_ID}), and each value so assumed is printed "
                    "on stderr with the option that overrides it.")
    official.add_argument("src", metavar="SRC",
                          help="checkpoint root, a <step>/ folder, its model_weights/, or a .npz")
    official.add_argument("dst", metavar="DST", help="output tttlm model directory")
    official.add_argument("--window", type=int, default=None, metavar="K",
                          help=f"sliding-window size k (default {OFFICIAL_WINDOW})")
    official.add_argument("--chunk", type=int, default=None, metavar="B",
                          help=f"TTT chunk size b (default {OFFICIAL_CHUNK_SIZE})")
    official.add_argument("--rope-theta", type=float, default=None, metavar="T",
                          help=f"RoPE base theta (default {OFFICIAL_ROPE_THETA:g})")
    official.add_argument("--bos-id", type=int, default=None, metavar="N",
                          help=f"BOS token id (default {OFFICIAL_BOS_ID}; required if the vocab "
                               "is smaller)")
    official.add_argument("--eos-id", type=int, default=None, metavar="N",
                          help=f"EOS token id (default {OFFICIAL_EOS_ID} if it fits the vocab, "
                               "else BOS)")
    official.add_argument("--variant", choices=("swa", "full"), default=None,
                          help="for checkpoints without prime MLPs: sliding-window or full "
                               "attention (default full); e2e is detected from the tensors")
    official.set_defaults(func=_run_official)
    _add_hf(sources)
    return convert
