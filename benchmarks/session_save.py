"""Cost of saving a session after each reply: whole-state saves vs paged saves.

    python benchmarks/session_save.py --preset 125m --dtype bfloat16 --out bench-results/

A server saves a session when each request completes (so a crash loses at most the requests in
flight). This builds a model of ``--preset`` (random weights), fills a one-sequence state as
after a long context (every window slot written: the caches hold random values, the fast weights
are the model's), then ``--replies`` times decodes ``--tokens`` tokens through ``Engine.step``
and saves the state both ways into folders of their own: ``State.save`` (one file, the whole
state) and ``State.save(paged=True, base=previous)`` (what ``tttlm serve`` does: only the pages
the reply changed, the rest hard-linked from the previous save). It reports the seconds and
bytes written per save, the load time, and the time of a fork (``tttlm serve`` hard-links the
files). Writes ``session_save.json`` and ``session_save.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tttlm import TTTConfig, TTTForCausalLM
from tttlm.files import link_or_copy
from tttlm.inference import Engine, State


def folder_bytes(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, bytes) of the files of a session folder."""
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in folder.iterdir()
            if not p.name.startswith(".")}


def written(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    """Bytes of the files that are new on disk (not a hard link of an earlier file)."""
    old = {inode for inode, _ in before.values()}
    return sum(size for inode, size in after.values() if inode not in old)


def filled_state(engine: Engine, seed: int, pending: int) -> State:
    state = engine.new_state(1)
    g = torch.Generator().manual_seed(seed)
    for t in [*state.prefix_keys, *state.prefix_values, *state.ttt_keys, *state.ttt_values]:
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    # As after `chunks` whole chunks and `pending` tokens of the next: the ring is full.
    window, chunk = engine.window or 0, engine.chunk
    chunks = (window // chunk) + 8
    state.lengths, state.chunks_done = [chunks * chunk + pending], [chunks]
    if state.pending_tokens is not None:
        state.pending_tokens.fill_(5)
    return state


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    config = TTTConfig.from_preset(args.preset)
    dtype = getattr(torch, args.dtype)
    model = TTTForCausalLM(config).to(dtype).eval()
    engine = Engine(model)
    if not 1 <= args.pending <= config.chunk_size:
        raise SystemExit(f"--pending must be 1..{config.chunk_size}")
    state = filled_state(engine, 0, args.pending)
    state_bytes = sum(t.numel() * t.element_size() for t in state._tensors().values())
    whole_dir, paged_root = work / "whole", work / "paged"
    paged_root.mkdir()
    rows = []
    g = torch.Generator().manual_seed(1)
    previous: Path | None = None
    for reply in range(args.replies + 1):
        if reply:  # reply 0 is the session's first save (after its document)
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                engine.step(state, torch.randint(0, config.vocab_size, (1,), generator=g))
            decode_s = time.perf_counter() - t0
        else:
            decode_s = 0.0
        before = folder_bytes(whole_dir) if whole_dir.exists() else {}
        t0 = time.perf_counter()
        state.save(whole_dir)
        whole_s = time.perf_counter() - t0
        whole_written = written(before, folder_bytes(whole_dir))
        target = paged_root / f"state-{reply:06d}"
        prior = folder_bytes(previous) if previous is not None else {}
        t0 = time.perf_counter()
        state.save(target, paged=True, base=previous)
        paged_s = time.perf_counter() - t0
        paged_written = written(prior, folder_bytes(target))
        t0 = time.perf_counter()
        loaded = State.load(target, model)
        load_s = time.perf_counter() - t0
        assert all(torch.equal(a, b) for a, b in zip(state._tensors().values(),
                                                     loaded._tensors().values()))
        if previous is not None:
            shutil.rmtree(previous)  # as the server does once the new save is in place
        previous = target
        rows.append({"reply": reply, "decode_s": decode_s, "whole_s": whole_s,
                     "whole_bytes": whole_written, "paged_s": paged_s,
                     "paged_bytes": paged_written, "load_s": load_s})
        print(f"reply {reply}: whole {whole_s:.2f}s {whole_written / 2**20:.1f} MiB, paged "
              f"{paged_s:.2f}s {paged_written / 2**20:.1f} MiB, load {load_s:.2f}s", flush=True)
    assert previous is not None
    fork = paged_root / "fork"
    t0 = time.perf_counter()
    fork.mkdir()
    for file in previous.iterdir():
        if not file.name.startswith("."):
            link_or_copy(file, fork / file.name)
    fork_s = time.perf_counter() - t0
    later = rows[1:]
    return {
        "benchmark": "session_save", "preset": args.preset, "dtype": args.dtype,
        "window": config.window, "chunk": config.chunk_size, "tokens_per_reply": args.tokens,
        "pending_at_start": args.pending,
        "replies": args.replies, "state_bytes": state_bytes, "rows": rows,
        "median_whole_s": statistics.median(r["whole_s"] for r in later),
        "median_paged_s": statistics.median(r["paged_s"] for r in later),
        "median_whole_bytes": statistics.median(r["whole_bytes"] for r in later),
        "median_paged_bytes": statistics.median(r["paged_bytes"] for r in later),
        "median_load_s": statistics.median(r["load_s"] for r in later),
        "fork_s": fork_s,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": torch.get_num_threads(), "python": sys.version.split()[0],
                    "torch": torch.__version__},
        "command": "python benchmarks/session_save.py " + " ".join(args.argv),
    }


def markdown(r: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        f"# Session saves per reply: whole state vs paged ({r['preset']}, {r['dtype']})", "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} threads, Python "
        f"{r['machine']['python']}, torch {r['machine']['torch']}; local disk, files fsynced.",
        "",
        f"One sequence, window {r['window']}, chunk {r['chunk']}: a state of "
        f"{r['state_bytes'] / mib:.1f} MiB with every window slot written and "
        f"{r['pending_at_start']} tokens of the current chunk read. Each reply decodes "
        f"{r['tokens_per_reply']} tokens (`Engine.step`), then the state is saved both ways.",
        "",
        "| reply | decode s | whole save s | whole MiB written | paged save s | "
        "paged MiB written | paged load s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['reply']} | {row['decode_s']:.2f} | {row['whole_s']:.3f} | "
                     f"{row['whole_bytes'] / mib:.1f} | {row['paged_s']:.3f} | "
                     f"{row['paged_bytes'] / mib:.2f} | {row['load_s']:.3f} |")
    ratio = r["median_whole_s"] / r["median_paged_s"]
    lines += ["", f"Median over replies 1–{r['replies']}: whole {r['median_whole_s']:.3f} s "
              f"and {r['median_whole_bytes'] / mib:.1f} MiB per save; paged "
              f"{r['median_paged_s']:.3f} s and {r['median_paged_bytes'] / mib:.2f} MiB "
              f"({ratio:.1f}x faster, "
              f"{r['median_whole_bytes'] / max(1, r['median_paged_bytes']):.0f}x fewer bytes). "
              f"A fork (hard links): {r['fork_s'] * 1e3:.1f} ms.", "",
              "Reply 0 is the first save of the session (everything is new). A paged save "
              "still reads and hashes the whole state (sha256); what it saves is writing and "
              "flushing the unchanged pages. Replies that complete a chunk also rewrite the "
              "fast weights and the TTT blocks' caches (their slots shift at each inner step)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per reply")
    parser.add_argument("--replies", type=int, default=4)
    parser.add_argument("--pending", type=int, default=1,
                        help="tokens of the current chunk read before the first reply (a "
                             "value near the chunk size makes the first reply finish a chunk)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the session files (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--name", default="session_save")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        report = run(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
