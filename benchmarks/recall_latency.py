"""What the retrieval memory costs a request: ``RecallSession.generate`` with ``rag=end`` vs
``rag=off`` after a long document, on a GPU with CUDA-graph decoding, beside full attention.

    PYTHONPATH=src python benchmarks/recall_latency.py --preset 760m --variants e2e full \\
        --contexts 8192 32768 131072 --out OUT/recall_latency_760m
    PYTHONPATH=src python benchmarks/recall_latency.py --model runs/smol-e2e/final \\
        --model smol-full --contexts 32768 --out OUT/recall_latency_smollm2

A random model of ``--preset`` in each of ``--variants`` (official vocabulary), or each saved
``--model`` folder, reads a document of random tokens (``--contexts`` tokens), then answers
``--requests`` requests in turn, each a prompt of 96 tokens whose last 32 repeat a span of the
document's first window (so that recall finds it and quotes passages, up to a quarter of the
window) followed by exactly ``--new-tokens`` greedy tokens (no stop token). Per request: the wall
time, the part spent in the memory (index build + search, host side), and the tokens read
(quoted passages included), split into the time to the first new token and the decoding after
it per token. The per-token decode step is the engine's either way: the memory
records tokens on the host and is searched once per request. A full-attention model keeps the
whole document in its cache and has no memory (rag=off only).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tttlm import TTTConfig, TTTForCausalLM
from tttlm.bench import environment, write_report
from tttlm.eval.common import default_label
from tttlm.inference import Engine
from tttlm.memory.memory import ContextMemory
from tttlm.memory.recall import RecallSession

COLUMNS = ("model", "context", "rag", "requests", "request_s_median", "memory_s_median",
           "read_tokens", "new_tokens", "ms_per_new_token", "first_token_s",
           "decode_ms_per_token", "ratio_vs_off", "ratio_vs_full", "decode_vs_full",
           "index_mib", "document_read_s")


class TimedRecall:
    """Adds up the time spent in :meth:`ContextMemory.recall` (index build + search)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = ContextMemory.recall

    def __enter__(self) -> TimedRecall:
        timer, original = self, self._original

        def recall(memory: ContextMemory, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(memory, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start

        ContextMemory.recall = recall  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        ContextMemory.recall = self._original  # type: ignore[method-assign]


class PlainSession:
    """A full-attention model's session: the whole document stays in its cache (no memory)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.state = engine, engine.new_state(1)
        self.last_recall: list[Any] = []
        self.memory = None

    def read(self, tokens: list[int]) -> None:
        _, self.state = self.engine.prefill([tokens], self.state)

    def stream(self, prompt: list[int], max_new_tokens: int, **sampling: Any) -> Any:
        stream = self.engine.stream([prompt], max_new_tokens, state=self.state, **sampling)
        self.state = stream.state  # which the stream advances in place as it decodes
        return stream


def measure(engine: Engine, context: int, rag: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(context)
    document = torch.randint(3, vocab, (context,), generator=gen).tolist()
    session: RecallSession | PlainSession = (
        PlainSession(engine) if engine.window is None else RecallSession(engine, rag))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    start = time.perf_counter()
    session.read(document)
    sync()
    read_s = time.perf_counter() - start
    rows = []
    for r in range(args.requests + 1):  # the first one warms up (graph capture), not counted
        head = torch.randint(3, vocab, (64,), generator=gen).tolist()
        at = 32 * (r + 1)
        prompt = head + document[at:at + 32]
        with TimedRecall() as timer:
            sync()
            start = time.perf_counter()
            stream = session.stream(prompt, args.new_tokens, temperature=0.0, stop=())
            next(stream)  # a Python int: the device has finished the prompt
            first = time.perf_counter() - start
            for _ in stream:
                pass
            sync()
            wall = time.perf_counter() - start
        new = stream.tokens[0]
        quoted = sum(len(p.tokens) + 1 for p in session.last_recall)
        rows.append((wall, timer.seconds, len(prompt) + quoted + (1 if quoted else 0), len(new),
                     first))
    timed = rows[1:]
    decode_ms = [1000 * (w - f) / max(1, n - 1) for w, _, _, n, f in timed]
    index_mib = None
    if session.memory is not None:
        session.memory.recall(prompt[-32:], 1)  # (re)builds the index, to report its size
        index_mib = round(session.memory.index.nbytes() / 2**20, 2)
    return {"context": context, "rag": rag, "requests": len(timed),
            "request_s_median": round(statistics.median(w for w, *_ in timed), 4),
            "memory_s_median": round(statistics.median(m for _, m, *_ in timed), 4),
            "read_tokens": timed[-1][2], "new_tokens": timed[-1][3],
            "ms_per_new_token": round(1000 * statistics.median(w for w, *_ in timed)
                                      / args.new_tokens, 3),
            "first_token_s": round(statistics.median(r[4] for r in timed), 4),
            "decode_ms_per_token": round(statistics.median(decode_ms), 3),
            "index_mib": index_mib,
            "document_read_s": round(read_s, 2),
            "request_times": [round(w, 4) for w, *_ in rows]}


def models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype
           ) -> list[tuple[str, TTTForCausalLM]]:
    """(label, model) for each ``--model`` folder, else ``--preset`` in each of ``--variants``
    (random weights)."""
    if args.model:
        return [(default_label(path),
                 TTTForCausalLM.from_pretrained(path, device=device, dtype=dtype).eval())
                for path in args.model]
    overrides = {} if args.preset != "tiny" else {"window": 64, "chunk_size": 16}
    out = []
    for variant in args.variants:
        torch.manual_seed(0)
        config = TTTConfig.from_preset(args.preset, variant, **overrides)
        out.append((f"{args.preset} {variant}", TTTForCausalLM(config).to(device, dtype).eval()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="760m")
    p.add_argument("--variants", nargs="+", default=["e2e"],
                   help="variants of --preset to measure (e2e, swa, full)")
    p.add_argument("--model", action="append", type=Path,
                   help="a saved model folder (repeat for several; replaces --preset)")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-graphs", dest="graphs", action="store_false")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    graphs = False
    for label, model in models(args, device, dtype):
        engine = Engine(model, cuda_graphs=args.graphs and device.type == "cuda")
        graphs = engine.cuda_graphs
        for context in args.contexts:
            modes = ("off",) if engine.window is None else ("off", "end")
            for rag in modes:
                rows.append({"model": label, **measure(engine, context, rag, args)})
                print(rows[-1], flush=True)
            if len(modes) == 2:
                off, end = rows[-2], rows[-1]
                end["ratio_vs_off"] = round(end["request_s_median"] / off["request_s_median"], 3)
        del engine, model
        torch.cuda.empty_cache() if device.type == "cuda" else None
    for full in [r for r in rows if r["index_mib"] is None]:
        for row in rows:
            if row is not full and row["context"] == full["context"]:
                row["ratio_vs_full"] = round(row["request_s_median"] / full["request_s_median"], 3)
                row["decode_vs_full"] = round(row["decode_ms_per_token"]
                                              / full["decode_ms_per_token"], 3)
    env = environment(device)
    env["command"] = "python benchmarks/recall_latency.py " + shlex.join(sys.argv[1:])
    names = ", ".join(dict.fromkeys(r["model"] for r in rows))
    write_report(args.out, f"Retrieval memory: request latency, {names}", env, rows,
                 COLUMNS, notes=[
                     f"A request = a 96-token prompt + {args.new_tokens} greedy tokens "
                     f"(CUDA-graph decoding: {graphs}), after a document of "
                     "`context` random tokens; median of the timed requests (a first one "
                     "warms up). memory_s = time inside ContextMemory.recall (index update "
                     "with the passages that left the window since the last search, and the "
                     "search); read_tokens = prompt + quoted passages; first_token_s = from the "
                     "request to its first new token (recall, reading the prompt and the quoted "
                     "passages); decode_ms_per_token = the rest of the request per further "
                     "token; ratio_vs_full / decode_vs_full = this row's request time / decode "
                     "time per token over the full-attention model's at the same context "
                     "(full attention keeps the whole document in its cache: no memory)."])


if __name__ == "__main__":
    main()
