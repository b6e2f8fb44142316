"""Cost of the retrieval memory per context length: bytes held, index build and query time.

    python benchmarks/memory_index.py --tokens 1000000 --out bench-results/

Random token ids (``--vocab``) stand in for text: BM25's index size depends on the number of
distinct terms per passage, which random ids overstate (real text repeats more), so this is an
upper bound. Passages of ``--passage`` tokens, unigram + bigram terms (the default index).
Writes ``memory_index.json`` and ``memory_index.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tttlm.memory import ContextMemory

INDEXES = {"fts5": "FTS5Index", "bm25s": "BM25Index"}


def measure(kind: str, tokens: int, vocab: int, passage: int, queries: int, seed: int
            ) -> dict[str, Any]:
    import tttlm.memory as M

    rng = np.random.default_rng(seed)
    stream = rng.integers(0, vocab, tokens)
    memory = ContextMemory(window=1, passage_len=passage, index=getattr(M, INDEXES[kind])())
    t0 = time.perf_counter()
    memory.extend(stream)
    add_s = time.perf_counter() - t0
    q = [stream[i:i + 32].tolist() for i in rng.integers(0, tokens - 32, queries)]
    t0 = time.perf_counter()
    memory.recall(q[0], budget=4 * passage)  # builds the index (bm25s)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = sum(bool(memory.recall(x, budget=4 * passage)) for x in q)
    query_s = (time.perf_counter() - t0) / queries
    # A request in a long session: 224 new tokens (3.5 passages) leave the window, then a recall.
    requests = []
    for x in q[:5]:
        t0 = time.perf_counter()
        memory.extend(rng.integers(0, vocab, 224))
        memory.recall(x, budget=4 * passage)
        requests.append(time.perf_counter() - t0)
    index = memory.index.nbytes()
    return {"index": kind, "tokens": tokens, "passages": memory.passages,
            "token_bytes": memory.nbytes() - index, "index_bytes": index, "add_s": add_s,
            "build_s": build_s, "query_s": query_s, "request_s": float(np.median(requests)),
            "queries_with_hits": hits, "queries": queries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--passage", type=int, default=64)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--indexes", nargs="+", choices=sorted(INDEXES),
                        default=["fts5", "bm25s"])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    rows = [measure(kind, n, args.vocab, args.passage, args.queries, seed=0)
            for n in args.tokens for kind in args.indexes]
    report = {"title": "Retrieval memory cost (BM25 over token uni+bigrams, random ids): "
                       "FTS5 vs bm25s",
              "env": {"python": platform.python_version(), "machine": platform.machine(),
                      "command": "python benchmarks/memory_index.py " + " ".join(sys.argv[1:])},
              "settings": {"vocab": args.vocab, "passage": args.passage}, "rows": rows}
    lines = [f"# {report['title']}", "", f"Command: `{report['env']['command']}`; Python "
             f"{report['env']['python']} ({report['env']['machine']}); vocabulary "
             f"{args.vocab}, passages of {args.passage} tokens.", "",
             "| index | context tokens | passages | tokens MiB | index MiB | MiB per 1M tokens | "
             "add s | build s | query ms | request ms |", "|" + "---|" * 10]
    for r in rows:
        mib = (r["token_bytes"] + r["index_bytes"]) / 2**20
        lines.append(f"| {r['index']} | {r['tokens']:,} | {r['passages']:,} | "
                     f"{r['token_bytes'] / 2**20:.1f} | {r['index_bytes'] / 2**20:.1f} | "
                     f"{mib / r['tokens'] * 1e6:.1f} | {r['add_s']:.2f} | {r['build_s']:.2f} | "
                     f"{r['query_s'] * 1e3:.1f} | {r['request_s'] * 1e3:.1f} |")
    lines += ["", "add = recording the context (terms of every passage; FTS5 indexes here); "
              "build = the first recall (bm25s builds its index in one go); request = 224 new "
              "tokens leave the window, then a recall (median of 5): what rag=end adds to a "
              "request of a long session. bm25s rebuilds at every recall after new passages; "
              "FTS5 adds them in place."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_index.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "memory_index.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
