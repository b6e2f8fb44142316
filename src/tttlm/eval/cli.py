"""``tttlm eval loss|niah|repeat|compare``: parse arguments, call :mod:`tttlm.eval`, print a table.

Bad input raises :class:`tttlm.eval.adapters.EvalError` (a :class:`tttlm.errors.UserError`),
which the top-level command line prints as one line (``tttlm eval loss: error: ...``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from tttlm.memory.index import RAG_HORIZON_HELP, RAG_INDEX_HELP, RAG_SEPARATOR_HELP
from tttlm.options import TTT_GROUP_HELP, group_size, ttt_group

_DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)  # above the progress bar, not through it


def _interrupted(out: Path) -> int:
    _log(f"interrupted: finished sequences are saved in {out / 'partial.jsonl'}; run the same "
         "command again to resume")
    return 130


def _load_models(args: argparse.Namespace) -> list[Any]:
    from tttlm.devices import resolve_device
    from tttlm.eval.adapters import EvalError
    from tttlm.eval.common import load_model, unique_labels

    device = resolve_device(args.device, option="--device")
    labels = args.label or []
    if labels and len(labels) != len(args.model):
        raise EvalError(f"{len(labels)} --label for {len(args.model)} --model; give one per "
                        "model or none")
    models = [load_model(path, device=device, ttt=False if args.no_ttt else None,
                         label=labels[i] if labels else None)
              for i, path in enumerate(args.model)]
    for em, label in zip(models, unique_labels([m.label for m in models])):
        em.label = label
        em.model.ttt_group = group_size(args.ttt_group)
    return models


def _run_loss(args: argparse.Namespace) -> int:
    from tttlm.devices import resolve_device
    from tttlm.eval.common import PartialResults, load_corpus, parse_int_list
    from tttlm.eval.loss import evaluate_loss, format_table, write_loss_outputs

    out = Path(args.out)
    try:
        lengths = parse_int_list(args.lengths, "--lengths")
        models = _load_models(args)
        for em in models:  # the loss runs the model's own forward: compiled blocks apply
            em.model.compile_blocks = args.compile
        corpus = load_corpus(args.data, tokenizer=args.tokenizer, model_dirs=args.model,
                             split=args.split, text_field=args.text_field)
        if args.fresh:
            PartialResults(out).clear()
        report = evaluate_loss(models, corpus, lengths, mode=args.windows,
                               max_sequences=args.max_sequences, batch_size=args.batch_size,
                               device=resolve_device(args.device, option="--device"),
                               out_dir=out,
                               curve_points=args.curve_points, progress=not args.quiet,
                               log=None if args.quiet else _log)
        written = write_loss_outputs(report, out, plots=not args.no_plots)
    except KeyboardInterrupt:
        return _interrupted(out)
    print(format_table(report))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _run_niah(args: argparse.Namespace) -> int:
    from tttlm.devices import resolve_device
    from tttlm.eval.adapters import (
        EvalError,
        builtin_books,
        load_prepared,
        read_documents,
        tokenize_documents,
    )
    from tttlm.eval.common import (
        PartialResults,
        find_tokenizer,
        parse_float_list,
        parse_int_list,
    )
    from tttlm.eval.niah import (
        NiahSettings,
        build_haystack,
        evaluate_niah,
        format_niah_table,
        model_predictor,
        niah_report,
        parse_kinds,
        write_niah_outputs,
    )

    out = Path(args.out)
    try:
        settings = NiahSettings(kinds=parse_kinds(args.kinds),
                                lengths=parse_int_list(args.lengths, "--lengths"),
                                depths=parse_float_list(args.depths, "--depths", 0.0, 1.0),
                                samples=args.samples, seed=args.seed, digits=args.digits)
        from tttlm.memory.recall import check_rag_options

        check_rag_options(args.rag, args.rag_index, args.rag_separator, args.rag_horizon)
        models = _load_models(args)
        source = Path(args.haystack) if args.haystack else builtin_books("val")[0]
        prepared = (source / "meta.json").is_file()
        # A prepared haystack carries its tokenizer: the last resort when the models do not.
        tokenizer = find_tokenizer(args.tokenizer, [*args.model, *([source] if prepared else [])])
        for em in models:
            if em.model.config.vocab_size < tokenizer.vocab_size:
                raise EvalError(f"{em.label} has vocab_size {em.model.config.vocab_size} but "
                                f"the tokenizer has {tokenizer.vocab_size} ids; pass the "
                                "model's tokenizer with --tokenizer")
        if prepared:
            corpus = load_prepared(source)
        else:
            corpus = tokenize_documents(read_documents(source), tokenizer, str(source))
        haystack = build_haystack(corpus, tokenizer)
        if args.fresh:
            PartialResults(out).clear()
        device = resolve_device(args.device, option="--device")
        records = {}
        for em in models:
            if args.rag != "off":
                from tttlm.eval.niah import recall_predictor
                from tttlm.memory.recall import separator_tokens

                # Filed apart: a resumed run never mixes answers with and without retrieval,
                # nor those of two indexes (the default index keeps its earlier fingerprint).
                em.label += " + retrieval"
                em.fingerprint += f"+rag{args.rag_budget or ''}"
                if args.rag_index is not None:
                    em.fingerprint += f"-{args.rag_index}"
                if args.rag_horizon is not None:
                    em.fingerprint += f"-horizon{args.rag_horizon}"
                separator = separator_tokens(args.rag_separator, tokenizer.encode)
                if separator is not None:
                    em.fingerprint += "-sep" + ",".join(map(str, separator))
                if args.rag == "chunk":
                    em.label += " (chunk)"
                    em.fingerprint += "-chunk"
                predictor = recall_predictor(em, tokenizer, logprob=not args.no_logprob,
                                             budget=args.rag_budget, index=args.rag_index,
                                             separator=separator, rag=args.rag,
                                             horizon=args.rag_horizon,
                                             cuda_graphs=args.cuda_graphs)
            else:
                predictor = model_predictor(em, tokenizer, logprob=not args.no_logprob,
                                            cuda_graphs=args.cuda_graphs)
            if args.cuda_graphs and device.type == "cuda":
                # (equal to rounding, not bit for bit: a resumed run does not mix the two)
                em.fingerprint += "-graphs"
            records[em.label] = evaluate_niah(em.label, haystack, tokenizer, settings,
                                              predictor, fingerprint=em.fingerprint,
                                              out_dir=out, progress=not args.quiet,
                                              batch_size=args.batch_size)
        report = niah_report([em.info for em in models], haystack, settings, records,
                             device=device)
        written = write_niah_outputs(report, out, plots=not args.no_plots)
    except KeyboardInterrupt:
        return _interrupted(out)
    print(format_niah_table(report))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _run_repeat(args: argparse.Namespace) -> int:
    from tttlm.devices import resolve_device
    from tttlm.eval.common import load_corpus, parse_int_list
    from tttlm.eval.repeat import (
        RepeatSettings,
        default_distances,
        evaluate_repeat,
        format_repeat_table,
        write_repeat_outputs,
    )

    models = _load_models(args)
    windows = [em.model.config.window for em in models if em.model.config.uses_window]
    distances = (parse_int_list(args.distances, "--distances") if args.distances
                 else default_distances(max(windows) if windows else None))
    settings = RepeatSettings(distances=distances, passage_len=args.passage_len, cue=args.cue,
                              lead=args.lead, samples=args.samples, seed=args.seed,
                              rag=[m.strip() for m in args.rag.split(",") if m.strip()],
                              horizon=args.rag_horizon)
    corpus = load_corpus(args.data, tokenizer=args.tokenizer, model_dirs=args.model,
                         split=args.split)
    report = evaluate_repeat(models, corpus, settings,
                             device=resolve_device(args.device, option="--device"),
                             progress=not args.quiet)
    written = write_repeat_outputs(report, args.out, plots=not args.no_plots)
    print(format_repeat_table(report))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from tttlm.eval.compare import compare

    path = compare(args.results, args.out, title=args.title, plots=not args.no_plots)
    print(f"wrote {path}")
    return 0


def _key_values(items: list[str] | None, option: str) -> dict[str, Any]:
    """``["k=v", ...]`` → ``{k: v}``; a value that reads as JSON (numbers, true, lists) is
    taken as such, anything else as a string."""
    from tttlm.eval.adapters import EvalError

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise EvalError(f"{option} {item!r} is not key=value; e.g. {option} batch_size=8")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def _limit(text: str) -> int | float:
    """lm-eval's --limit: a count of documents per task, or a fraction of them below 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count (e.g. 100) or a "
                                         "fraction below 1 (e.g. 0.1)")
    return int(value) if value >= 1 else value


def _run_harness(args: argparse.Namespace) -> int:
    from tttlm.eval.adapters import EvalError
    from tttlm.eval.common import parse_int_list

    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError("lm-evaluation-harness is not installed; install it with "
                        "pip install 'tttlm[eval]'")
    from tttlm.devices import resolve_device
    from tttlm.hf.harness import evaluate
    from tttlm.hf.results import format_results, write_results

    if not Path(args.model).is_dir():  # before lm-eval spends seconds indexing its tasks
        raise EvalError(f"model folder not found: {args.model}; give a tttlm model folder")
    model_args = _key_values(args.model_args, "--model-args")
    metadata = _key_values(args.metadata, "--metadata")
    if args.lengths:
        metadata["max_seq_lengths"] = parse_int_list(args.lengths, "--lengths")
    model_args.setdefault("batch_size", args.batch_size)
    if "device" not in model_args:
        model_args["device"] = str(resolve_device(args.device, option="--device"))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(args.model, tasks, model_args=model_args, limit=args.limit,
                       metadata=metadata, include_path=args.include_path,
                       num_fewshot=args.num_fewshot, log_samples=False)
    written = write_results(results, args.out)
    print(format_results(results))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _common(p: argparse.ArgumentParser, out_default: str, *, lengths: bool = True,
            resumable: bool = True) -> None:
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="a tttlm model folder (repeat for several models; the first is the "
                        "reference of differences)")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="display name per --model, in order (default: the run's name for "
                        "RUN/final, 'RUN step N' for a checkpoint, else the folder's name)")
    if lengths:
        p.add_argument("--lengths", required=True, metavar="L,L,...",
                       help="context lengths in tokens, e.g. 1024,2048 or 8k,16k")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="tokenizer for text input: bytes, a tokenizer.json, a tiktoken file "
                        "or a prepared data folder (default: the model folder's own)")
    p.add_argument("--no-ttt", action="store_true",
                   help="run e2e models without test-time training (pretrain mode)")
    p.add_argument("--ttt-group", type=ttt_group, default="auto", metavar="N",
                   help=TTT_GROUP_HELP)
    p.add_argument("--device", default="auto",
                   help="cuda, cpu, ... (default: cuda when available, with bf16 autocast)")
    if resumable:
        p.add_argument("--out", default=out_default, metavar="DIR",
                       help=f"output folder (default {out_default}); finished items are kept "
                            "in DIR/partial.jsonl and a rerun resumes from them")
        p.add_argument("--fresh", action="store_true",
                       help="discard DIR/partial.jsonl instead of resuming")
    else:
        p.add_argument("--out", default=out_default, metavar="DIR",
                       help=f"output folder (default {out_default})")
    p.add_argument("--no-plots", action="store_true", help="write JSON/CSV only")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` with ``loss``, ``niah``, ``repeat`` and ``compare`` on the top-level
    CLI."""
    ev = subparsers.add_parser(
        "eval", help="evaluate models: loss by context length, needle in a haystack",
        description="Evaluate tttlm models and compare them.")
    sub = ev.add_subparsers(dest="eval_command", metavar="TASK", required=True)

    loss = sub.add_parser(
        "loss", help="per-token loss by position and context length",
        description="Mean NLL of every counted target (a target equal to BOS is not counted) "
                    "of sequences of each context length, with per-position curves. Writes "
                    "loss.json, loss_table.csv, loss_curves.csv and PNG plots.")
    _common(loss, "eval-loss")
    loss.add_argument("--data", required=True, metavar="PATH",
                      help="a prepared data folder (tokens as they are) or a .txt/.jsonl/"
                           ".jsonl.gz/.parquet file or folder of long held-out documents")
    loss.add_argument("--split", default=None,
                      help="split of a prepared folder (default: val if present, else train)")
    loss.add_argument("--text-field", default="text", help="JSON field holding the text")
    loss.add_argument("--windows", choices=("document", "stream"), default="document",
                      help="a sequence is a window of one document (default) or of the "
                           "concatenated stream of documents")
    loss.add_argument("--max-sequences", type=int, default=None, metavar="N",
                      help="at most N sequences per length (default: all the data allows)")
    loss.add_argument("--batch-size", type=int, default=1, metavar="B",
                      help="sequences per forward pass")
    loss.add_argument("--curve-points", type=int, default=1024, metavar="P",
                      help="points of the stored per-position curve (positions are averaged "
                           "in bins of ceil(L/P))")
    loss.add_argument("--compile", action="store_true",
                      help="torch.compile the blocks (TTTForCausalLM.compile_blocks): faster on "
                           "GPU after a compilation per sequence shape; same losses")
    loss.set_defaults(func=_run_loss)

    niah = sub.add_parser(
        "niah", help="needle in a haystack (RULER-style single needle)",
        description="A needle sentence with a key and a value at a given depth of a haystack "
                    "of book text cut to the exact length, then a question. Scored by exact "
                    "match of the greedy answer and by the log-probability of the value. "
                    "Writes niah.json and heatmaps.")
    _common(niah, "eval-niah")
    niah.add_argument("--depths", default=_DEFAULT_DEPTHS, metavar="D,D,...",
                      help=f"needle depths in [0, 1] (default {_DEFAULT_DEPTHS})")
    niah.add_argument("--kinds", default="passkey,number,uuid", metavar="K,K,...",
                      help="needle kinds: passkey, number, uuid (default: all)")
    niah.add_argument("--samples", type=int, default=4, metavar="N",
                      help="samples per (kind, length, depth) cell")
    niah.add_argument("--seed", type=int, default=0, help="seed of haystacks, keys and values")
    niah.add_argument("--digits", type=int, default=None,
                      help="digits of passkey/number values (default 5 and 7)")
    niah.add_argument("--haystack", metavar="PATH",
                      help="text file/folder or prepared folder of haystack text "
                           "(default: the built-in held-out books)")
    niah.add_argument("--no-logprob", action="store_true",
                      help="skip the log-probability of the value (greedy answer only)")
    niah.add_argument("--batch-size", type=int, default=1, metavar="N",
                      help="prompts of one length decoded together, N at a time (--rag "
                           "chunk: one at a time): on a GPU decoding is bound by kernel "
                           "launches, so N prompts cost about what one does")
    niah.add_argument("--cuda-graphs", action="store_true",
                      help="on a GPU, the engine's CUDA graphs (Engine(cuda_graphs=True)): "
                           "haystacks longer than the window read with the inner step "
                           "replayed; equal to the eager engine to rounding")
    niah.add_argument("--rag", choices=("off", "end", "chunk"), default="off",
                      help="retrieval memory: end = the question recalls passages of the "
                           "haystack that left the window and quotes them back before it; "
                           "chunk = also before each chunk of the haystack (sliding-window "
                           "models)")
    niah.add_argument("--rag-budget", type=int, default=None, metavar="N",
                      help="tokens of quoted passages (default: a quarter of the window)")
    niah.add_argument("--rag-index", default=None, metavar="fts5|bm25|dense",
                      help=RAG_INDEX_HELP)
    niah.add_argument("--rag-separator", default=None, metavar="TEXT",
                      help=RAG_SEPARATOR_HELP)
    niah.add_argument("--rag-horizon", type=int, default=None, metavar="N",
                      help=RAG_HORIZON_HELP)
    niah.set_defaults(func=_run_niah)

    rep = sub.add_parser(
        "repeat", help="loss on the second reading of a passage, by distance to the first",
        description="Sequences BOS, lead, P, gap of d tokens, P (P a held-out passage): the "
                    "mean NLL of P after its first cue tokens at the first and the second "
                    "reading, for each distance d. Full attention copies at any distance, "
                    "sliding-window attention only inside its window, TTT-E2E partly beyond "
                    "it; --rag end adds retrieval (the cue is the query). Writes repeat.json, "
                    "repeat.csv and repeat.png.")
    _common(rep, "eval-repeat", lengths=False, resumable=False)
    rep.add_argument("--data", required=True, metavar="PATH",
                     help="held-out text: a prepared data folder or .txt/.jsonl files")
    rep.add_argument("--split", default=None, help="split of a prepared folder")
    rep.add_argument("--distances", metavar="D,D,...",
                     help="gaps in tokens (default: w/2, w, 2w, 4w, 8w, 16w for the largest "
                          "window w)")
    rep.add_argument("--passage-len", type=int, default=64, metavar="P",
                     help="tokens of the repeated passage")
    rep.add_argument("--cue", type=int, default=8, metavar="C",
                     help="first tokens of each reading that are not scored (the query of "
                          "--rag end)")
    rep.add_argument("--lead", type=int, default=64, metavar="N",
                     help="tokens of text before the first reading")
    rep.add_argument("--samples", type=int, default=4, metavar="N",
                     help="sequences per distance")
    rep.add_argument("--seed", type=int, default=0, help="seed of passage and text choice")
    rep.add_argument("--rag", default="off", metavar="off,end",
                     help="retrieval modes to run (default off; end: recall before each "
                          "reading's cue; sliding-window models only)")
    rep.add_argument("--rag-horizon", type=int, default=None, metavar="N",
                     help=RAG_HORIZON_HELP)
    rep.set_defaults(func=_run_repeat)

    har = sub.add_parser(
        "harness", help="lm-evaluation-harness tasks (RULER, ...) on a model folder",
        description="Run lm-evaluation-harness tasks on a tttlm model folder through the "
                    "lm-eval model type tttlm (the eval extra). Writes harness.json "
                    "(lm-eval's results) and harness.csv, and prints lm-eval's table. "
                    "RULER tasks need the folder's tokenizer files (tttlm.hf.save_tokenizer) "
                    "and --lengths. See docs/hf.md.")
    har.add_argument("--model", required=True, metavar="DIR", help="a tttlm model folder")
    har.add_argument("--tasks", required=True, metavar="T,T,...",
                     help="lm-eval task, group or tag names, e.g. niah_single_1,ruler_vt")
    har.add_argument("--limit", type=_limit, default=None, metavar="N",
                     help="at most N documents per task (a number below 1: that fraction)")
    har.add_argument("--batch-size", type=int, default=1, metavar="B",
                     help="requests of one length per forward pass")
    har.add_argument("--lengths", metavar="L,L,...",
                     help="RULER context lengths in tokens (metadata max_seq_lengths), "
                          "e.g. 1k,4k")
    har.add_argument("--model-args", action="append", metavar="K=V",
                     help="argument of the tttlm model type (repeat): dtype=bfloat16, "
                          "max_length=N, ttt=false, inner_lr=..., max_gen_toks=N")
    har.add_argument("--metadata", action="append", metavar="K=V",
                     help="task metadata (repeat), e.g. max_seq_lengths=[1024,2048]")
    har.add_argument("--num-fewshot", type=int, default=None, metavar="N",
                     help="few-shot examples per document (default: each task's own)")
    har.add_argument("--include-path", action="append", metavar="DIR",
                     help="a folder of extra lm-eval task YAML files (repeat)")
    har.add_argument("--device", default="auto",
                     help="cuda, cpu, ... (default: cuda when available)")
    har.add_argument("--out", default="eval-harness", metavar="DIR",
                     help="output folder (default eval-harness)")
    har.set_defaults(func=_run_harness)

    cmp = sub.add_parser(
        "compare", help="merge result files into one Markdown report with plots",
        description="Merge loss.json/niah.json files (or folders holding them) of several "
                    "runs into OUT/report.md with the plots redrawn over all models; the first "
                    "model is the reference of differences.")
    cmp.add_argument("results", nargs="+", metavar="RESULTS",
                     help="loss.json / niah.json files or the folders holding them")
    cmp.add_argument("--out", default="eval-report", metavar="DIR",
                     help="output folder (default eval-report)")
    cmp.add_argument("--title", default="tttlm evaluation report", help="report title")
    cmp.add_argument("--no-plots", action="store_true", help="tables only")
    cmp.set_defaults(func=_run_compare)
    return ev
