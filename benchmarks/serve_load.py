"""A bounded load test of ``tttlm serve`` on localhost, through the official ``openai`` client.

    python benchmarks/serve_load.py --sessions 32 --tokens 64 --rounds 2 --out load/

Starts a server (a given model folder, or a tiny random model), creates ``--sessions``
sessions from a document each, then for every round sends one completion per session, all at
once (``--tokens`` new tokens, greedy). It reports generated tokens per second and the p50/p99
latency of the requests per round, and checks that nothing was lost: every request returned
its tokens, each session holds exactly the tokens it was sent and generated, and after a
SIGTERM and a restart every session is still there with the same count. Fewer sessions in
memory than sessions (``--in-memory``, default half) makes the server evict to disk and
reload between rounds. Writes ``serve_load.json`` and ``serve_load.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DOCUMENT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it "
            "was the age of foolishness, it was the epoch of belief, it was the epoch of "
            "incredulity. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_model(folder: Path, preset: str, variant: str) -> Path:
    """A randomly initialised model: ``tiny`` (window 64, chunk 16) or an official size with the
    byte tokenizer's 258 ids (the server falls back to bytes for a folder without a tokenizer)."""
    import torch

    from tttlm import TTTConfig, TTTForCausalLM

    torch.manual_seed(0)
    if preset == "tiny":
        config = TTTConfig.from_preset("tiny", variant, window=64, chunk_size=16)
    else:
        config = TTTConfig.from_preset(preset, variant, vocab_size=258, bos_token_id=256,
                                       eos_token_id=257)
    return TTTForCausalLM(config).save_pretrained(folder)


def document(chars: int | None) -> str:
    """The text each session is created from: the short default, or ``chars`` bytes of it."""
    if chars is None:
        return DOCUMENT
    return (DOCUMENT * (chars // len(DOCUMENT) + 1))[:chars]


def gpu_memory_used_gib() -> float | None:
    """The card's used memory (all processes), from nvidia-smi; None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return round(float(out.split()[0]) / 1024, 2)


class Server:
    def __init__(self, model: Path, sessions: Path, log: Path, args: argparse.Namespace) -> None:
        import openai

        self.port = free_port()
        command = [sys.executable, "-m", "tttlm.cli", "serve", "--model", str(model),
                   "--port", str(self.port), "--sessions", str(sessions), "--model-name", "m",
                   "--max-sessions-in-memory", str(args.in_memory), "--max-batch",
                   str(args.max_batch), "--log-level", "warning"]
        if args.dtype:
            command += ["--dtype", args.dtype]
        if args.device:
            command += ["--device", args.device]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1",
                                    api_key="unused", max_retries=0, timeout=args.timeout)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.client.models.list()
                return
            except openai.APIConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    raise SystemExit("the server did not start:\n" + log.read_text()) from None
                time.sleep(0.2)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def progress(what: str, since: float) -> None:
    """One line per phase on stderr, so that a run cut short still says how far it got."""
    print(f"[serve_load] {what} ({time.perf_counter() - since:.1f} s)", file=sys.stderr,
          flush=True)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    began = time.perf_counter()
    model = args.model or random_model(work / "model", args.preset, args.variant)
    sessions_dir, log = work / "sessions", work / "server.log"
    server = Server(model, sessions_dir, log, args)
    progress("server up", began)
    client = server.client
    ids = [f"load-{i}" for i in range(args.sessions)]
    expected: dict[str, int] = {}
    text = document(args.context)
    memory_before = gpu_memory_used_gib()
    start = time.perf_counter()
    for sid in ids:
        created = client.post("/sessions", body={"session_id": sid, "document": text},
                              cast_to=object)
        expected[sid] = int(created["tokens"])
        if len(expected) in (1, len(ids)) or len(expected) % 8 == 0:
            progress(f"{len(expected)}/{len(ids)} sessions created", began)
    create_s = time.perf_counter() - start
    session_bytes = int(client.get(f"/sessions/{ids[0]}", cast_to=object)["bytes"])

    def one(sid: str, r: int) -> tuple[str, float, int, int]:
        start = time.perf_counter()
        reply = client.completions.create(
            model="m", prompt=f" Round {r}.", max_tokens=args.tokens, temperature=0.0,
            extra_body={"session_id": sid, "ignore_eos": True})
        return (sid, time.perf_counter() - start, reply.usage.prompt_tokens,
                reply.usage.completion_tokens)

    # One request first, not counted: the server's first batch pays one-off set-up costs.
    client.completions.create(model="m", prompt="Warm-up.", max_tokens=args.tokens,
                              temperature=0.0)
    rounds = []
    for r in range(args.rounds):
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.sessions) as pool:
            results = list(pool.map(one, ids, [r] * len(ids)))
        wall = time.perf_counter() - start
        latencies = [lat for _, lat, _, _ in results]
        generated = sum(n for *_, n in results)
        for sid, _, prompt, completion in results:
            expected[sid] += prompt + completion
        rounds.append({"round": r, "requests": len(results), "wall_s": wall,
                       "generated_tokens": generated, "tokens_per_s": generated / wall,
                       "latency_p50_s": percentile(latencies, 50),
                       "latency_p99_s": percentile(latencies, 99),
                       "latency_mean_s": statistics.fmean(latencies),
                       "short_replies": sum(n != args.tokens for *_, n in results)})
        progress(f"round {r}: {generated} tokens in {wall:.1f} s", began)
    memory_after = gpu_memory_used_gib()
    held = {sid: client.get(f"/sessions/{sid}", cast_to=object)["tokens"] for sid in ids}
    disk_bytes = sum(f.stat().st_size for f in sessions_dir.rglob("*") if f.is_file())
    code = server.stop()
    restarted = Server(model, sessions_dir, log, args)
    after = {sid: restarted.client.get(f"/sessions/{sid}", cast_to=object)["tokens"]
             for sid in ids}
    restarted.stop()
    lost = sorted(sid for sid in ids if held[sid] != expected[sid] or after[sid] != expected[sid])
    import torch

    return {
        "title": "tttlm serve load test (localhost, openai client)",
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "machine": platform.machine(), "cpus": os.cpu_count(), "gpu": gpu_name(),
                "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])},
        "settings": {"sessions": args.sessions, "tokens": args.tokens, "rounds": args.rounds,
                     "in_memory": args.in_memory, "max_batch": args.max_batch,
                     "model": str(args.model) if args.model else model_label(args),
                     "dtype": args.dtype or "server's default", "device": args.device or "auto",
                     "context_chars": len(text)},
        "create": {"sessions": len(ids), "wall_s": create_s,
                   "prefill_tokens_per_s": sum(expected.values()) / create_s},
        "session_state_bytes": session_bytes,
        "session_files_bytes": disk_bytes,
        "gpu_memory_used_gib": {"before_sessions": memory_before, "after_rounds": memory_after},
        "rounds": rounds,
        "server_exit_code": code,
        "sessions_lost_or_wrong": lost,
        "errors_in_log": "Traceback" in log.read_text(),
    }


def gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def model_label(args: argparse.Namespace) -> str:
    if args.preset == "tiny":
        return f"tiny random {args.variant} (window 64, chunk 16)"
    return f"{args.preset} random {args.variant} (official shape, byte vocabulary of 258)"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# {report['title']}", "",
             f"- {s['sessions']} concurrent sessions × {s['tokens']} tokens × {s['rounds']} "
             f"rounds; {s['in_memory']} sessions in memory (the rest evicted to disk and "
             f"reloaded); batch ≤ {s['max_batch']}; model: {s['model']}, dtype {s['dtype']}.",
             f"- Python {report['env']['python']}, torch {report['env']['torch']}, "
             f"{report['env']['cpus']} CPUs ({report['env']['machine']}), GPU: "
             f"{report['env'].get('gpu') or 'none'}.",
             f"- Each session created from a document of {s.get('context_chars')} characters "
             f"(bytes = tokens): {report['create']['wall_s']:.1f} s for all "
             f"({report['create']['prefill_tokens_per_s']:.0f} tokens/s); one session's state "
             f"{report['session_state_bytes'] / 2**20:.1f} MiB; session files on disk "
             f"{report['session_files_bytes'] / 2**30:.2f} GiB in all; GPU memory used "
             f"(nvidia-smi, whole card) {report['gpu_memory_used_gib']}.",
             f"- Command: `{report['env']['command']}`", "",
             "| round | requests | wall s | generated tokens | tokens/s | p50 s | p99 s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {r['requests']} | {r['wall_s']:.2f} | "
                     f"{r['generated_tokens']} | {r['tokens_per_s']:.1f} | "
                     f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} |")
    lost = report["sessions_lost_or_wrong"]
    lines += ["", f"Nothing lost: {not lost and not report['errors_in_log']} (sessions whose "
              f"token count was wrong before or after a restart: {lost or 'none'}; short "
              f"replies: {sum(r['short_replies'] for r in report['rounds'])}; tracebacks in the "
              f"server log: {report['errors_in_log']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a tttlm model folder (default: a random "
                        "model of --preset)")
    parser.add_argument("--preset", default="tiny", help="tiny or an official size (125m, ...)")
    parser.add_argument("--variant", default="e2e", choices=["e2e", "swa", "full"])
    parser.add_argument("--context", type=int, default=None,
                        help="characters (= tokens) of each session's document (default: a "
                             "short paragraph)")
    parser.add_argument("--device", default=None, help="the server's --device")
    parser.add_argument("--name", default="serve_load", help="report file stem")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--in-memory", type=int, help="sessions kept in memory (default: half)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--dtype", help="e.g. float32, bfloat16 (default: the model's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--out", type=Path, default=Path("serve-load"))
    args = parser.parse_args(argv)
    if args.in_memory is None:
        args.in_memory = max(1, args.sessions // 2)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    ok = not report["sessions_lost_or_wrong"] and not report["errors_in_log"] and not any(
        r["short_replies"] for r in report["rounds"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
