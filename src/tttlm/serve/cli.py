"""``tttlm serve``: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tttlm.memory.index import RAG_HORIZON_HELP, RAG_INDEX_HELP, RAG_SEPARATOR_HELP
from tttlm.options import TTT_GROUP_HELP, group_size, ttt_group

# FastAPI, uvicorn, torch and the model are imported in run(): `tttlm --help` builds every
# subcommand's parser and should not pay for them (nor need the serve extra).

API_KEY_ENV = "TTTLM_API_KEY"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with sessions",
        description="Serve a tttlm model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models) with persistent sessions "
                    "(/v1/sessions): a session keeps what the model learned at test time, at "
                    "constant memory, across requests and restarts. Needs the serve extra.")
    parser.add_argument("--model", required=True, help="model directory (config.json + "
                        "model.safetensors; its tokenizer and chat template when present)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--sessions", help="folder of the persistent sessions (locked while "
                        "the server runs); without it the server keeps no sessions")
    parser.add_argument("--max-sessions-in-memory", type=int, default=8,
                        help="idle sessions kept in memory (least recently used ones are "
                             "dropped; they are on disk)")
    parser.add_argument("--model-name", help="the model's id in the API (default: the "
                        "model folder's name)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                        f"(default: ${API_KEY_ENV} when set, else no key)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="requests decoded together at most")
    parser.add_argument("--max-tokens", type=int, default=2048,
                        help="tokens one request may generate at most")
    parser.add_argument("--max-prompt-tokens", type=int, default=1 << 20,
                        help="new tokens one request may read at most")
    parser.add_argument("--max-request-bytes", type=int, default=16 << 20,
                        help="largest request body")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a request may take; then its generation ends "
                             "(finish_reason 'length')")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds to let running requests finish at shutdown; the rest "
                             "end early with their sessions saved")
    parser.add_argument("--rag", choices=["off", "end", "chunk"], default="off",
                        help="retrieval memory: end = each prompt's end (its last 32 tokens) "
                             "recalls passages that left the window and reads them again "
                             "before it; chunk = also before each chunk of a long prompt or "
                             "document; sessions keep their memory; a request may choose "
                             "off/end/chunk with its rag field")
    parser.add_argument("--rag-budget", type=int, default=None,
                        help="tokens of recalled passages per prompt (default: a quarter of "
                             "the window)")
    parser.add_argument("--rag-index", default=None, metavar="fts5|bm25|dense",
                        help=RAG_INDEX_HELP)
    parser.add_argument("--rag-separator", default=None, metavar="TEXT",
                        help=RAG_SEPARATOR_HELP)
    parser.add_argument("--rag-horizon", type=int, default=None, metavar="N",
                        help=RAG_HORIZON_HELP)
    parser.add_argument("--no-ttt", action="store_true", help="do not learn at test time")
    parser.add_argument("--ttt-group", type=ttt_group, default="auto", metavar="N",
                        help=TTT_GROUP_HELP)
    parser.add_argument("--device", default=None,
                        help="auto (default: cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float64"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from tttlm.errors import UserError

    try:
        import uvicorn

        from tttlm.serve.app import Service, create_app
    except ImportError as err:
        raise UserError(f"tttlm serve needs {err.name}; install the serve extra: "
                        "pip install 'tttlm[serve]'") from None
    from tttlm.serve.limits import Limits
    from tttlm.serve.loading import load_served
    from tttlm.serve.sessions import SessionStore

    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must be in [0, 65535]")
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    max_request_bytes=args.max_request_bytes, timeout=args.timeout)
    limits.check()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    model_dir = Path(args.model)
    served = load_served(model_dir, device=args.device, dtype=args.dtype,
                         ttt=False if args.no_ttt else None, name=args.model_name)
    served.engine.model.ttt_group = group_size(args.ttt_group)
    policy = None
    if args.rag != "off":
        from tttlm.memory.recall import RecallPolicy, separator_tokens

        # An index that cannot be built here is one line now, not a failure at a request.
        policy = RecallPolicy.for_engine(served.engine, budget=args.rag_budget,
                                         index=args.rag_index, horizon=args.rag_horizon,
                                         separator=separator_tokens(args.rag_separator,
                                                                    served.tokenizer.encode))
    else:
        from tttlm.memory.recall import check_rag_options

        check_rag_options(args.rag, args.rag_index, args.rag_separator, args.rag_horizon)
    store = None
    if args.sessions:
        store = SessionStore(Path(args.sessions), served.engine, args.max_sessions_in_memory,
                             policy)
        store.open()  # a folder another server holds is refused here, before binding
    service = Service(served, store, limits=limits, max_batch=args.max_batch, api_key=api_key,
                      policy=policy, rag="end" if args.rag == "off" else args.rag)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"tttlm serve: warning: listening on {args.host} without an API key; anyone who "
              f"can reach it can use it (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port,
                    log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout)
    finally:
        if store is not None:
            store.close()  # when startup failed before the app's own shutdown ran
    return 0
