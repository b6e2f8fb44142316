"""Memory traffic and matmul FLOPs of one prefill step at a preset's real shapes, on a CPU.

    PYTHONPATH=src python benchmarks/traffic.py --preset 3b --tokens 8192 --batch 4

The step runs on fake tensors (``FakeTensorMode``: shapes only, no memory, no arithmetic)
under bf16 autocast, through the scoring forward that ``tttlm bench prefill`` times. Every
ATen op is logged with the bytes it reads and writes (its tensor arguments and results,
counted once each) and, for matrix products, its FLOPs; ops are attributed to the line of
``tttlm`` that issued them (backward ops to the forward line, through autograd's anomaly
metadata). Attention is replaced by a stand-in that costs nothing here: its kernels are
counted apart on a GPU (``benchmarks/profile_step.py``).

What it tells: the time a step cannot beat on a card, ``FLOPs / matmul rate + bytes /
bandwidth`` (defaults: an H200's measured 777 TFLOP/s and 4.8 TB/s), and which lines move
the bytes, so that a GPU profile's copy and elementwise groups can be read line by line. It is
a lower bound per op (every byte moved once at full bandwidth); eager op boundaries only
(compiled blocks fuse some of the elementwise ops counted here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tttlm.config import TTTConfig
from tttlm.model import layers
from tttlm.model.model import TTTForCausalLM
from tttlm.ops import linear_nll as linear_nll_module
from tttlm.ops import rope as rope_module
from tttlm.ops.attention import AutoBackend, attention_backend, register_attention_backend
from tttlm.options import group_size, ttt_group

# Ops that make views, allocate or only describe tensors: no bytes moved.
_FREE = {"view", "_unsafe_view", "as_strided", "expand", "t", "transpose", "permute",
         "unsqueeze", "squeeze", "slice", "select", "alias", "detach", "empty", "empty_like",
         "empty_strided", "new_empty", "new_empty_strided", "unflatten", "split", "chunk",
         "unbind", "_reshape_alias", "lift_fresh", "split_with_sizes", "diagonal",
         "view_as_complex", "view_as_real", "_conj", "conj", "is_same_size"}
_MATMUL = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear"}
_ROOT = Path(__file__).resolve().parents[1]


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (id(t), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# Ops that touch only the indexed elements of their source (gather) or destination (scatter).
_GATHER = {"gather", "index_select", "index", "take_along_dim"}
_SCATTER = {"scatter_add_", "scatter_", "scatter_add", "scatter", "index_put_", "index_add_",
            "index_copy_"}


def _moved(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """Bytes an op reads and writes, each tensor counted once (see the module docstring)."""
    inputs, outputs = _tensors((args, kwargs)), _tensors(out)
    if not outputs:  # a question about a tensor (its device, size, ...), not a kernel
        return 0
    if name in _GATHER:  # the indices, the gathered values read and written
        return _bytes(inputs[1:]) + 2 * _bytes(outputs)
    if name in _SCATTER:  # the indices and values read, as many destination values updated
        return 3 * _bytes(inputs[1:])
    if name == "copy_":  # the destination is written, the source read
        return _bytes(inputs)
    if name.endswith("_"):  # in place: the first argument is read and written
        return _bytes(inputs) + _bytes(inputs[:1])
    return _bytes(inputs) + _bytes(outputs)


def _flops(name: str, args: tuple[Any, ...], out: Any) -> int:
    if name not in _MATMUL:
        return 0
    a = next(t for t in args if isinstance(t, torch.Tensor) and t.dim() >= 2
             and (name not in {"addmm", "baddbmm", "addbmm"} or t is not args[0]))
    result = _tensors(out)[0]
    return 2 * result.numel() * a.shape[-1]


# The block code torch.compile fuses with ``compile_blocks`` (layers.py's compiled parts).
_COMPILED_CODE = {"attention_inputs", "attention_output"}


def _where() -> tuple[str, bool]:
    """The innermost ``tttlm`` line of the current stack, or of the forward that made the
    autograd node running now, and whether it lies in block code that ``compile_blocks``
    compiles (norms, RoPE, casts and activations fused there; matmuls stay apart)."""
    # (the autograd node running now; None outside a backward pass or on a torch without it)
    node = getattr(torch._C, "_current_autograd_node", lambda: None)()
    prefix = ""
    frames: list[Any] = traceback.extract_stack()
    if node is not None:
        prefix = "backward of "
        stack = node.metadata.get("traceback_", [])
        if stack:
            frames = [traceback.FrameSummary(*_split(line)) for line in _frames(stack)]
    compiled = any(f.name in _COMPILED_CODE and f.filename.endswith("layers.py")
                   for f in frames)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/tttlm/" in path and "/benchmarks/" not in path:
            short = path[path.rindex("/tttlm/") + 1:]
            return f"{prefix}{short}:{frame.lineno} {frame.name}", compiled
    return prefix + "(outside tttlm)", compiled


def _frames(stack: Any) -> list[str]:
    text = "".join(stack) if isinstance(stack, list) else str(stack)
    return [line for line in text.splitlines() if line.strip().startswith("File ")]


def _split(line: str) -> tuple[str, int, str]:
    # '  File "path", line N, in name'
    parts = line.strip().split(", ")
    path = parts[0][len('File "'):-1]
    lineno = int(parts[1].split()[1])
    name = parts[2][len("in "):] if len(parts) > 2 else "?"
    return path, lineno, name


class Census(TorchDispatchMode):
    """Bytes and FLOPs of every op, by op name and by issuing line."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # calls, bytes, flops
        self.by_line: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        # "blocks": inside the block code compile_blocks compiles; "eager": everything else.
        self.by_region: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.depth = 0  # > 0 inside a function counted as one fused pass (see fused())

    def count(self, name: str, moved: int, flops: int) -> None:
        where, compiled = _where()
        region = "blocks" if compiled else "eager"
        for table, key in ((self.by_region, region), (self.by_op, name),
                           (self.by_line, f"{region}: {where} [{name}]")):
            table[key][0] += 1
            table[key][1] += moved
            table[key][2] += flops

    def fused(self, fn: Any) -> Any:
        """``fn`` counted as one pass: its tensor arguments read once, its results written
        once (a lower bound for what Inductor makes of it: reductions may read twice)."""
        def run(*args: Any) -> Any:
            self.depth += 1
            try:
                out = fn(*args)
            finally:
                self.depth -= 1
            self.count(f"fused {fn.__name__}", _bytes(_tensors(args)) + _bytes(_tensors(out)), 0)
            return out
        return run

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            # A host read of a value fake tensors do not hold: the input checks pass (ids in
            # range, nothing bad found) and so does the finiteness guard (its flag is True).
            if args[0].dtype != torch.bool:
                return 0
            return any(f.filename.replace("\\", "/").endswith("ttt/finite.py")
                       for f in traceback.extract_stack())
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _FREE or self.depth:
            return out
        moved = _moved(name, args, kwargs, out)
        if moved:
            self.count(name, moved, _flops(name, args, out))
        return out


class _FreeAttention(torch.autograd.Function):
    """Attention's output shape at no cost, with gradients of the shapes autograd expects."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.shapes = (q, k, v)
        return q.new_empty(q.shape[:-1] + (v.shape[-1],))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.new_empty(t.shape) for t in ctx.shapes)


class FreeAttention(AutoBackend):
    """The census's attention backend: no traffic counted (see the module docstring)."""

    name = "census-free"

    def sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        return _FreeAttention.apply(q, k, v)

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
              **kwargs: Any) -> torch.Tensor:
        return _FreeAttention.apply(q, k, v)


def census(preset: str, tokens: int, batch: int, variant: str = "e2e",
           what: str = "prefill", compiled: bool = False,
           ttt_group: int | str | None = "auto") -> Census:
    """Count one step on fake tensors: ``prefill`` (the scoring forward without gradient,
    what ``tttlm bench prefill`` times) or ``train`` (the meta-training forward and the
    backward of its loss, without the optimizer). ``compiled``: the model as with compiled
    blocks, where the head's elementwise functions (``tttlm.ops.linear_nll``) and the TTT
    chunks' frozen attention operands (``tttlm.ops.rope.frozen_chunk_operands``) are
    compiled: each call is counted as one fused pass; the block code is still counted op by
    op."""
    config = TTTConfig.from_preset(preset, variant=variant)
    register_attention_backend(FreeAttention(), replace=True)
    counter = Census()
    with contextlib.ExitStack() as stack:
        if compiled:
            # Block code runs eager here (fake tensors do not compile); the head's compiled
            # functions run as counted fused passes.
            stack.enter_context(_patched(layers, "_parts", lambda compiled, rotated: (
                layers.Block.attention_inputs, layers.Block.attention_output)))
            stack.enter_context(_patched(linear_nll_module, "_run", lambda fn, on: (
                counter.fused(fn) if on else fn)))
            stack.enter_context(_patched(rope_module, "_frozen_operands_compiled", lambda: (
                counter.fused(rope_module._frozen_operands))))
        _run_step(counter, config, tokens, batch, variant, what, compiled, ttt_group)
    return counter


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Any:
    """``module.name = value`` for the block (a name an older tree lacks is left unused)."""
    missing = object()
    old = getattr(module, name, missing)
    setattr(module, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(module, name)
        else:
            setattr(module, name, old)


def _run_step(counter: Census, config: TTTConfig, tokens: int, batch: int, variant: str,
              what: str, compiled: bool, ttt_group: int | str | None) -> None:
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = TTTForCausalLM(config)
        model.compile_blocks = compiled
        model.ttt_group = ttt_group
        model.train(what == "train")
        x = torch.zeros(batch, tokens + 1, dtype=torch.long)
        grad = torch.enable_grad() if what == "train" else torch.no_grad()
        with (grad, attention_backend("census-free"),
              torch.autograd.set_detect_anomaly(True, check_nan=False), counter):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x[:, :-1], labels=x[:, 1:], ttt=variant == "e2e")
            if what == "train":
                out.loss.backward()


def report(counter: Census, tokens: int, batch: int, flops_rate: float, bandwidth: float,
           top: int) -> dict[str, Any]:
    total_bytes = sum(v[1] for v in counter.by_op.values())
    total_flops = sum(v[2] for v in counter.by_op.values())
    per_1k = 1000 / (tokens * batch)
    matmul_s = total_flops / flops_rate * per_1k
    moved_s = total_bytes / bandwidth * per_1k
    lines = sorted(counter.by_line.items(), key=lambda kv: -kv[1][1])[:top]
    ops = sorted(counter.by_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "tokens": tokens, "batch": batch,
        "matmul_tflop": total_flops / 1e12, "moved_gb": total_bytes / 1e9,
        "matmul_s_per_1k": matmul_s, "traffic_s_per_1k": moved_s,
        "bound_s_per_1k": matmul_s + moved_s,
        "regions": {k: {"calls": v[0], "gb": v[1] / 1e9, "tflop": v[2] / 1e12}
                    for k, v in counter.by_region.items()},
        "top_lines": [{"line": k, "calls": v[0], "gb": v[1] / 1e9, "tflop": v[2] / 1e12}
                      for k, v in lines],
        "top_ops": [{"op": k, "calls": v[0], "gb": v[1] / 1e9, "tflop": v[2] / 1e12}
                    for k, v in ops],
    }


def markdown(reports: list[dict[str, Any]], top: int = 12) -> str:
    """The reports side by side (one column each), then each one's largest lines outside the
    compiled block code."""
    def row(name: str, values: list[str]) -> str:
        return f"| {name} | " + " | ".join(values) + " |"

    labels = [r.get("label") or f"{r['what']} {r['tokens']} x {r['batch']}" for r in reports]
    out = [row("", labels), "|---|" + "---|" * len(reports)]
    out.append(row("matmul TFLOP per step", [f"{r['matmul_tflop']:.1f}" for r in reports]))
    out.append(row("GB moved per step", [f"{r['moved_gb']:,.0f}" for r in reports]))
    for region, name in (("eager", "of which outside the block code"),
                         ("blocks", "of which in block code (compiled where it applies)")):
        out.append(row(name, [f"{r['regions'].get(region, {}).get('gb', 0):,.0f}"
                              for r in reports]))
    out.append(row("matmul s / 1K tokens", [f"{r['matmul_s_per_1k']:.4f}" for r in reports]))
    out.append(row("traffic s / 1K tokens", [f"{r['traffic_s_per_1k']:.4f}" for r in reports]))
    out.append(row("sum s / 1K tokens", [f"{r['bound_s_per_1k']:.4f}" for r in reports]))
    for label, r in zip(labels, reports):
        out += ["", f"Largest lines outside the block code, {label}:", "",
                "| GB | TFLOP | calls | line [op] |", "|---|---|---|---|"]
        eager = [x for x in r["top_lines"] if x["line"].startswith("eager: ")][:top]
        out += [f"| {x['gb']:,.1f} | {x['tflop']:.1f} | {x['calls']} | "
                f"`{x['line'][len('eager: '):]}` |" for x in eager]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("prefill", "train"), default="prefill")
    parser.add_argument("--preset", default="3b")
    parser.add_argument("--variant", default="e2e")
    parser.add_argument("--compiled", action="store_true",
                        help="as with compiled blocks: the head's compiled functions counted "
                             "as one fused pass each")
    parser.add_argument("--ttt-group", default="auto", metavar="N", type=ttt_group,
                        help="the model's ttt_group: N sequences, 'all' or 'auto' (default)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--flops", type=float, default=777e12, help="matmul FLOP/s")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--label", default="", help="the report's name in --markdown tables")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--markdown", nargs="+", type=Path, metavar="JSON",
                        help="no count: print the given JSON reports side by side (Markdown)")
    args = parser.parse_args()
    if args.markdown:
        print(markdown([json.loads(p.read_text()) for p in args.markdown]), end="")
        return 0
    group = group_size(args.ttt_group)
    counter = census(args.preset, args.tokens, args.batch, args.variant, args.what,
                     args.compiled, ttt_group=group)
    result = {"label": args.label, "what": args.what, "preset": args.preset,
              "variant": args.variant, "compiled": args.compiled, "torch": torch.__version__,
              "ttt_group": args.ttt_group,
              **report(counter, args.tokens, args.batch, args.flops, args.bandwidth, args.top)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
