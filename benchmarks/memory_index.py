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


def measure(tokens: int, vocab: int, passage: int, queries: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, vocab, tokens)
    memory = ContextMemory(window=1, passage_len=passage)
    t0 = time.perf_counter()
    memory.extend(stream)
    add_s = time.perf_counter() - t0
    q = [stream[i:i + 32].tolist() for i in rng.integers(0, tokens - 32, queries)]
    t0 = time.perf_counter()
    memory.recall(q[0], budget=4 * passage)  # builds the index
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = sum(bool(memory.recall(x, budget=4 * passage)) for x in q)
    query_s = (time.perf_counter() - t0) / queries
    index = memory.index.nbytes()
    return {"tokens": tokens, "passages": memory.passages,
            "token_bytes": memory.nbytes() - index, "index_bytes": index, "add_s": add_s,
            "build_s": build_s, "query_s": query_s, "queries_with_hits": hits, "queries": queries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--passage", type=int, default=64)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    rows = [measure(n, args.vocab, args.passage, args.queries, seed=0) for n in args.tokens]
    report = {"title": "Retrieval memory cost (BM25 over token uni+bigrams, random ids)",
              "env": {"python": platform.python_version(), "machine": platform.machine(),
                      "command": "python benchmarks/memory_index.py " + " ".join(sys.argv[1:])},
              "settings": {"vocab": args.vocab, "passage": args.passage}, "rows": rows}
    lines = [f"# {report['title']}", "", f"Command: `{report['env']['command']}`; Python "
             f"{report['env']['python']} ({report['env']['machine']}); vocabulary "
             f"{args.vocab}, passages of {args.passage} tokens.", "",
             "| context tokens | passages | tokens MiB | index MiB | MiB per 1M tokens | "
             "build s | query ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mib = (r["token_bytes"] + r["index_bytes"]) / 2**20
        lines.append(f"| {r['tokens']:,} | {r['passages']:,} | {r['token_bytes'] / 2**20:.1f} "
                     f"| {r['index_bytes'] / 2**20:.1f} | {mib / r['tokens'] * 1e6:.1f} | "
                     f"{r['build_s']:.2f} | {r['query_s'] * 1e3:.1f} |")
    lines += ["", "The index is rebuilt at the first recall after new passages (bm25s builds "
              "in one go): build time is paid once per recall with rag=end."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_index.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "memory_index.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
