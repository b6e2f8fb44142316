"""``tttlm generate``: stream text from a model, optionally after reading a document, with
sessions that keep the model's test-time memory across invocations."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tttlm.memory.index import RAG_HORIZON_HELP, RAG_INDEX_HELP, RAG_SEPARATOR_HELP

if TYPE_CHECKING:
    import torch

# The model, engine and tokenizer modules are imported in run(): `tttlm --help` builds every
# subcommand's parser and should not pay for them.


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="generate text, learning from the context at test time",
        description="Stream text from a tttlm model. With --document the model first reads a "
                    "file (learning from it as it goes); --save-session keeps what it learned "
                    "and --session continues from it.")
    parser.add_argument("--model", required=True, help="model directory (config.json + "
                        "model.safetensors)")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--document", help="text file to read before the prompt")
    parser.add_argument("--tokenizer", help="tokenizer: 'bytes', a tokenizer.json, a folder "
                        "holding one, a tiktoken file or a prepared data folder (default: the "
                        "model directory's, else bytes)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--session", help="continue the session saved in this directory")
    parser.add_argument("--save-session", help="save the session to this directory at the end")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not put BOS in front of a new session's text")
    parser.add_argument("--no-ttt", action="store_true", help="do not learn at test time")
    parser.add_argument("--device", default=None,
                        help="auto (default: cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float64"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay what repeats with one shape as CUDA graphs: the "
                             "decoding step, a session's prompt pieces, the inner step once "
                             "the caches are full (Engine(cuda_graphs=True); no-op off CUDA)")
    parser.add_argument("--rag", choices=["off", "end", "chunk"], default="off",
                        help="retrieval memory: end = the text's last 32 tokens recall "
                             "passages of the document that left the window and read them "
                             "again before those tokens; chunk = also before each chunk of "
                             "the document, recalled by the last 32 tokens read (sliding-"
                             "window models; this run only, not with sessions)")
    parser.add_argument("--rag-budget", type=int, default=None, metavar="N",
                        help="tokens of recalled passages (default: a quarter of the window)")
    parser.add_argument("--rag-index", default=None, metavar="fts5|bm25|dense",
                        help=RAG_INDEX_HELP)
    parser.add_argument("--rag-separator", default=None, metavar="TEXT",
                        help=RAG_SEPARATOR_HELP)
    parser.add_argument("--rag-horizon", type=int, default=None, metavar="N",
                        help=RAG_HORIZON_HELP)
    parser.set_defaults(func=run)
    return parser


def _identity(tokenizer: Any) -> str:
    """What makes two tokenizers the same: their saved files and ``meta.json`` entry."""
    import hashlib
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        entry = tokenizer.save(Path(tmp))
        h = hashlib.sha256(json.dumps(entry, sort_keys=True).encode())
        for file in sorted(Path(tmp).iterdir()):
            h.update(file.name.encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def _describe(tokenizer: Any) -> str:
    return f"{tokenizer.kind}, {tokenizer.vocab_size} ids"


def _tokenizer(spec: str | None, model_dir: Path, vocab_size: int) -> Any:
    """The model folder's tokenizer, else the one ``spec`` names, else byte-level.

    An explicit ``spec`` that differs from the folder's tokenizer is refused (a smaller
    vocabulary "fits" the model but decodes to garbage), as is a tokenizer with more ids than
    the model has.
    """
    from tttlm.data.tokenizer import ByteTokenizer, folder_tokenizer, resolve_tokenizer
    from tttlm.errors import UserError

    own = folder_tokenizer(model_dir)
    if spec is not None:
        tokenizer = resolve_tokenizer(spec)
        if own is not None and _identity(tokenizer) != _identity(own):
            raise UserError(
                f"--tokenizer {spec} ({_describe(tokenizer)}) differs from the tokenizer the "
                f"model folder {model_dir} holds ({_describe(own)}), so its text would be "
                "garbage; drop --tokenizer to use the folder's")
    elif own is not None:
        tokenizer = own
    else:
        # Byte-level models have 256 ids (the official fixture's) or 256 + BOS/EOS.
        tokenizer = ByteTokenizer()
        if vocab_size not in (256, tokenizer.vocab_size):
            raise UserError(
                f"{model_dir} holds no tokenizer and its vocabulary ({vocab_size}) is not "
                "byte-level; pass --tokenizer (the tokenizer.json or prepared data folder the "
                "model was trained with)")
        return tokenizer
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                        f"{vocab_size}; pass the --tokenizer the model was trained with")
    return tokenizer


class _TextStream:
    """Turns a growing list of ids into newly printable text (holds back a partial
    character until its bytes are complete)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new


def run(args: argparse.Namespace) -> int:
    import torch

    from tttlm.devices import autocast_dtype, resolve_device
    from tttlm.errors import UserError
    from tttlm.inference.engine import Engine
    from tttlm.inference.state import State, check_session_folder
    from tttlm.model.model import TTTForCausalLM

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    if not args.prompt and not args.document:
        raise UserError("nothing to read; give --prompt TEXT and/or --document FILE")
    if args.document and not Path(args.document).is_file():
        raise UserError(f"--document {args.document} is not a file; give a text file")
    if args.rag != "off" and (args.session or args.save_session):
        # A session folder holds the decoding state alone; RecallSession and `tttlm serve
        # --rag end` keep a memory beside it.
        raise UserError("--rag end keeps its memory for this run only; drop --session and "
                        "--save-session (tttlm serve --rag end keeps memories in sessions)")
    from tttlm.memory.recall import check_rag_options

    check_rag_options(args.rag, args.rag_index, args.rag_separator, args.rag_horizon)
    if args.save_session:
        check_session_folder(args.save_session)  # before the work that it would keep
    device = resolve_device(args.device, option="--device")
    # Default: the weights in the precision autocast would compute in (bf16 on a GPU).
    dtype = getattr(torch, args.dtype) if args.dtype else (autocast_dtype(device)
                                                            or torch.float32)
    model_dir = Path(args.model)
    model = TTTForCausalLM.from_pretrained(model_dir, device=device, dtype=dtype).eval()
    tokenizer = _tokenizer(args.tokenizer, model_dir, model.config.vocab_size)
    config = model.config
    engine = Engine(model, ttt=False if args.no_ttt else None, cuda_graphs=args.cuda_graphs)
    session = None
    if args.rag != "off":
        from tttlm.memory.recall import RecallSession, separator_tokens

        session = RecallSession(engine, args.rag, budget=args.rag_budget, index=args.rag_index,
                                horizon=args.rag_horizon,
                                separator=separator_tokens(args.rag_separator,
                                                           tokenizer.encode))
    state = State.load(args.session, model, device=device) if args.session else None
    if state is not None and state.batch_size != 1:
        raise UserError(f"session {args.session} holds {state.batch_size} sequences; the "
                        "command line continues one")
    text = ""
    if args.document:
        text = Path(args.document).read_text(encoding="utf-8")
        if args.prompt:
            text += "\n"
    text += args.prompt
    ids = tokenizer.encode(text)
    if state is None and not args.no_bos:
        ids = [config.bos_token_id, *ids]
    if not ids:
        raise UserError("the prompt encodes to no tokens; give a longer --prompt")

    t0 = time.perf_counter()
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "seed": args.seed}
    if session is not None:
        # The session reads all but the query into the state and the memory (rag=chunk:
        # recalling before each chunk of it too), then the recalled passages and the query.
        stream: Any = session.stream(ids, args.max_new_tokens, **sampling)
        read = stream.read
        recalled = session.last_recall
        quoted = session.quoted_while_reading
        print(f"recalled {len(recalled)} passages "
              f"({sum(len(p.tokens) for p in recalled)} tokens) of {session.memory.passages}"
              + (f"; {quoted} tokens quoted before chunks while reading" if quoted else ""),
              file=sys.stderr)
    else:
        stream = engine.stream([ids], args.max_new_tokens, state=state, **sampling)
        read = len(ids)
    _sync(device)
    t1 = time.perf_counter()
    out = _TextStream(tokenizer)
    for step in stream:
        piece = out.push(step[0])
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    _sync(device)
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    n_new = len(stream.tokens[0])
    skipped = stream.state.skipped_updates[0]
    print(f"read {read} tokens in {t1 - t0:.2f} s ({read / (t1 - t0):.1f} tok/s); "
          f"generated {n_new} tokens in {t2 - t1:.2f} s "
          f"({n_new / max(t2 - t1, 1e-9):.1f} tok/s); context now "
          f"{stream.state.lengths[0]} tokens"
          + (f"; {skipped} non-finite inner updates skipped" if skipped else ""),
          file=sys.stderr)
    if args.save_session:
        # Paged: continuing a session into its own folder (or from --session into a new one,
        # whose packs are hard-linked) writes only the pages this run changed.
        stream.state.save(args.save_session, paged=True, base=args.session)
        print(f"session saved to {args.save_session}", file=sys.stderr)
    return 0


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
