"""The window kernels compiled for an H100/H200 (sm_90a) on a CPU: registers, spills and how
their loops use the tensor cores, without device time.

Triton compiles a kernel to PTX without a GPU, and its wheel carries ``ptxas``. This compiles
the TTT chunk's forward (``ops/triton_window_fwd.py``, chunk and whole-sequence tiles), the
frozen cache's dq (``ops/triton_frozen_dq.py``) and the own keys' dk, dv
(``ops/triton_own_dkdv.py``) at 3b's shapes (with ``--train-kernels``, also the
meta-training chunk attention's backward and double-backward kernels,
``ops/triton_chunk_attention.py``, at 125m's head width 64 and their tiles in use), with
the specialisation the JIT gives them there (every pointer and integer argument a multiple
of 16: strides 2560 and 80, 32 heads, chunks of 1024, caches of 8192), for each tile
configuration asked for, and reports per kernel:

- registers per thread and spilled bytes (``ptxas -v``), and ptxas's performance warnings
  (C7514: tensor-core products serialized);
- shared memory, and the count of tensor-core products (``wgmma.mma_async``), of their waits
  (``wgmma.wait_group``), of asynchronous copies (``cp.async``) and of exponentials
  (``ex2.approx``) in the PTX;
- per loop of the machine code (``cuobjdump -sass`` of the cubin; a block that branches back
  to itself), its instructions and, among them, exponentials (``MUFU.EX2``), forward branches
  (``BRA``, a part the loop may skip) and barriers: an SM's sub-partition issues one
  instruction a clock and its multi-function unit takes 8 clocks a warp's ``MUFU``, so the two
  counts tell which of them bounds the softmax's elementwise work;
- per loop (a PTX block that branches back to itself), its sequence of product groups, waits
  and exponentials: where the tensor cores wait and where they run beside the softmax; and
  its shared-memory work outside the copies: barriers (``bar.sync``) and register tiles
  written to and read back from shared memory (``stmatrix``/``ldmatrix``, the way a
  register tensor is transposed or re-laid out).

The local Triton may not be the one a GPU run uses (the device has 3.6): same kernels,
possibly other code. Use it to reject a change before spending device time on it, not to
time it.

    python benchmarks/kernel_sm90.py --out benchmarks/results/kernel_sm90_cpu \\
        --fwd-configs 128,64,4,3 64,64,4,3 --dq-configs 64,64,4,3 --own-configs 64,64,4,3
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tttlm.ops import triton_frozen_dq, triton_own_dkdv, triton_window_fwd
from tttlm.ops.triton_tiles import head_split

TARGET = GPUTarget("cuda", 90, 32)
HEAD = 80  # 3b's head width
FLOAT_ARGS = {"scale"}
FP32_POINTERS = {"LSE", "LSE2", "DELTA", "DR", "DBAR", "CR"}  # (LSE2: trees before 20689c4)
INT64_POINTERS = {"QP", "KP"}  # (positions, in the meta-training kernels)
# (the kernels' other capitalised arguments are tensors)
INTEGERS = {"H", "C", "P", "WINDOW", "Tq", "Tk"}
TRAIN_HEAD = 64  # 125m's head width
# the meta-training kernels compiled, each with the name of its tiles in CONFIGS
TRAIN_CONFIG = {"_bwd_dq_kernel": "bwd_dq", "_bwd_dkdv_kernel": "bwd_dkdv",
                "_dbl_dq_kernel": "dbl_dq", "_dbl_dkdv_kernel": "dbl_dkdv"}
TRAIN_KERNELS = tuple(TRAIN_CONFIG)


def _signature(fn: Any, consts: dict[str, Any]) -> tuple[dict[str, str], dict, dict]:
    """Types of ``fn``'s arguments (bf16 tensors, an fp32 log-sum-exp, 32-bit integers, an
    fp32 scale), its constants, and the divisibility the JIT would find at 3b's shapes."""
    sig: dict[str, str] = {}
    constants: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constants[(i,)] = consts[name]
            continue
        if name in FLOAT_ARGS:
            sig[name] = "fp32"
            continue
        sig[name] = ("*fp32" if name in FP32_POINTERS else "*i64" if name in INT64_POINTERS
                     else "*bf16" if name[0].isupper() and name not in INTEGERS else "i32")
        attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constants, attrs


# The CUDA tools Triton's wheel carries.
WHEEL_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _ptxas() -> list[Path]:
    """The ptxas binaries Triton's wheel carries (the newest PTX needs the newer one)."""
    return [p for p in (WHEEL_BIN / "ptxas-blackwell", WHEEL_BIN / "ptxas") if p.exists()]


def _assemble(ptx: str, work: Path) -> dict[str, Any]:
    source = work / "kernel.ptx"
    source.write_text(ptx)
    for ptxas in _ptxas():
        run = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(source), "-o",
                              str(work / "kernel.cubin")], capture_output=True, text=True)
        text = run.stdout + run.stderr
        if run.returncode == 0:
            regs = re.search(r"Used (\d+) registers", text)
            spill_st = re.search(r"(\d+) bytes spill stores", text)
            spill_ld = re.search(r"(\d+) bytes spill loads", text)
            return {"ptxas": ptxas.name, "registers": int(regs.group(1)) if regs else None,
                    "spill_stores": int(spill_st.group(1)) if spill_st else 0,
                    "spill_loads": int(spill_ld.group(1)) if spill_ld else 0,
                    "warnings": sorted(set(re.findall(r"\((C\d+)\) ([^\n]*?) in the function",
                                                      text)))}
    return {"ptxas": None, "error": "no ptxas of the wheel assembled this PTX"}


def _loop_bodies(ptx: str) -> list[list[str]]:
    """The lines of each loop: from a label to a branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^\$(L__BB\d+_\d+)", line))}
    bodies = []
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+\$(L__BB\d+_\d+);", line)
        if m and labels.get(m.group(1), i + 1) <= i:
            bodies.append(lines[labels[m.group(1)]:i])
    return bodies


def _sass_loops(sass: str) -> list[dict[str, int]]:
    """Each loop of ``cuobjdump -sass`` text (a block ending in a branch back to its first
    address): its instructions, ``MUFU.EX2``, forward branches inside it and barriers."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for line in sass.splitlines()
           if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line))]
    target = {a: int(m.group(1), 16) for a, text in ins
              if (m := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text))}
    at = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, _) in enumerate(ins):
        if target.get(a, a + 1) > a or target[a] not in at:
            continue
        body = ins[at[target[a]]:i + 1]
        loops.append({"instructions": len(body),
                      "mufu_ex2": sum("MUFU.EX2" in t for _, t in body),
                      "forward_branches": sum(target.get(b, b) > b for b, _ in body),
                      "barriers": sum("BAR.SYNC" in t for _, t in body)})
    return loops


def _sass(work: Path) -> str:
    """The machine code of ``work/kernel.cubin`` (the wheel's ``cuobjdump``), or ``""``."""
    tool = WHEEL_BIN / "cuobjdump"
    cubin = work / "kernel.cubin"
    if not tool.exists() or not cubin.exists():
        return ""
    run = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True)
    return run.stdout if run.returncode == 0 else ""


def _loops(ptx: str) -> list[list[str]]:
    """Each loop's sequence of events: ``mma NxK xcount``, ``wait``, ``ex2 xcount``."""
    loops = []
    for body in _loop_bodies(ptx):
        events: list[list[Any]] = []
        for line in body:
            if (mma := re.search(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", line)):
                event = f"mma {mma.group(1)}"
            elif "wgmma.wait_group" in line:
                event = "wait"
            elif "ex2.approx" in line:
                event = "ex2"
            else:
                continue
            if events and events[-1][0] == event and event != "wait":
                events[-1][1] += 1
            else:
                events.append([event, 1])
        loops.append([e if n == 1 else f"{e} x{n}" for e, n in events])
    return loops


SHARED_WORK = ("bar.sync", "stmatrix", "ldmatrix")


def _loop_shared(ptx: str) -> list[dict[str, int]]:
    """Each loop's barriers and register tiles moved through shared memory (per iteration)."""
    return [{op: sum(op in line for line in body) for op in SHARED_WORK}
            for body in _loop_bodies(ptx)]


def _compile(fn: Any, consts: dict[str, Any], warps: int, stages: int,
             work: Path) -> dict[str, Any]:
    sig, constants, attrs = _signature(fn, consts)
    kernel = triton.compile(ASTSource(fn, sig, constants, attrs), target=TARGET,
                            options={"num_warps": warps, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    return {"shared_bytes": kernel.metadata.shared,
            "mma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "waits": len(re.findall(r"wgmma\.wait_group", ptx)),
            "cp_async": len(re.findall(r"cp\.async\.", ptx)),
            "ex2": len(re.findall(r"ex2\.approx", ptx)),
            **_assemble(ptx, work), "loops": _loops(ptx), "loop_shared": _loop_shared(ptx),
            "sass_loops": _sass_loops(_sass(work))}


def _tiles(text: str) -> tuple[int, int, int, int]:
    a, b, warps, stages = (int(x) for x in text.split(","))
    return a, b, warps, stages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fwd-configs", nargs="*", default=[],
                    help="BM,BN,WARPS,STAGES of the forward (default: its chunk and "
                         "whole-sequence tiles)")
    ap.add_argument("--dq-configs", nargs="*", default=[],
                    help="BM,BN,WARPS,STAGES of the frozen dq (default: its tiles)")
    ap.add_argument("--own-configs", nargs="*", default=[],
                    help="BN,BM,WARPS,STAGES of the own keys' dk, dv (default: its tiles)")
    ap.add_argument("--settle", nargs="*", type=int,
                    default=[triton_window_fwd.SETTLE_SHIFT],
                    help="the forward's settled shifts to compile (0: the running maximum)")
    ap.add_argument("--train-kernels", action="store_true",
                    help="also the meta-training chunk attention's backward kernels (bf16, "
                         "head width 64, their tiles in use)")
    ap.add_argument("--out", required=True, help="report path without extension")
    args = ap.parse_args(argv)
    if not _ptxas():
        print("kernel_sm90.py: error: Triton's wheel carries no ptxas here; install a "
              "triton wheel for x86-64 Linux", file=sys.stderr)
        return 2
    da, db = head_split(HEAD)
    fwd = args.fwd_configs or [",".join(map(str, triton_window_fwd.DEFAULT_CONFIG)),
                               ",".join(map(str, triton_window_fwd.SEQUENCE_CONFIG))]
    dq = args.dq_configs or [",".join(map(str, triton_frozen_dq.DEFAULT_CONFIG))]
    own = args.own_configs or [",".join(map(str, triton_own_dkdv.DEFAULT_CONFIG))]
    work = Path(args.out + ".work")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for text in dict.fromkeys(fwd):
        bm, bn, warps, stages = _tiles(text)
        for settle in dict.fromkeys(args.settle):
            rows.append({"kernel": f"window forward, settle {settle}", "tiles": text,
                         **_compile(triton_window_fwd._window_fwd_kernel,
                                    dict(BM=bm, BN=bn, DA=da, DB=db, HAS_WINDOW=True,
                                         DESC=False, SETTLE=settle), warps, stages, work)})
    for text in dict.fromkeys(dq):
        bm, bn, warps, stages = _tiles(text)
        rows.append({"kernel": "frozen dq (own keys folded in)", "tiles": text, **_compile(
            triton_frozen_dq._frozen_dq_kernel,
            dict(BM=bm, BN=bn, DA=da, DB=db, HAS_WINDOW=True, HAS_DQC=False, OWN=True,
                 DESC=False, STORE_DELTA=False), warps, stages, work)})
    for text in dict.fromkeys(own):
        bn, bm, warps, stages = _tiles(text)
        rows.append({"kernel": "own keys' dk, dv", "tiles": text, **_compile(
            triton_own_dkdv._own_dkdv_kernel, dict(BN=bn, BM=bm, DA=da, DB=db), warps, stages,
            work)})
    if args.train_kernels:
        import triton.language as tl

        from tttlm.ops import triton_chunk_attention as tca

        for name in TRAIN_KERNELS:
            cfg = tca.CONFIGS[TRAIN_CONFIG[name]]
            rows.append({"kernel": f"meta-training {name.strip('_')}",
                         "tiles": f"{cfg.block_m},{cfg.block_n},{cfg.num_warps},{cfg.num_stages}",
                         **_compile(getattr(tca, name),
                                    dict(D=TRAIN_HEAD, HAS_WINDOW=True, SKIP=True,
                                         ACC=tl.float32, PREC="tf32", BM=cfg.block_m,
                                         BN=cfg.block_n, BD=TRAIN_HEAD),
                                    cfg.num_warps, cfg.num_stages, work)})
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    report = {"triton": triton.__version__, "target": "sm_90a",
              "command": "python benchmarks/kernel_sm90.py " + " ".join(argv or sys.argv[1:]),
              "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    lines = [f"Triton {triton.__version__}, sm_90a, head width {HEAD} = {da} + {db}.", "",
             "| kernel | tiles | registers | spills (st/ld B) | shared B | wgmma | waits | "
             "cp.async | ex2 | ptxas warnings |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        warn = "; ".join(code for code, _ in r.get("warnings", [])) or "none"
        lines.append(f"| {r['kernel']} | {r['tiles']} | {r.get('registers')} | "
                     f"{r.get('spill_stores')}/{r.get('spill_loads')} | {r['shared_bytes']} | "
                     f"{r['mma']} | {r['waits']} | {r['cp_async']} | {r['ex2']} | {warn} |")
    for r in rows:
        lines += ["", f"{r['kernel']} {r['tiles']}, loops:"]
        lines += [f"- {' → '.join(loop)}; shared memory: "
                  + ", ".join(f"{op} {n}" for op, n in shared.items())
                  for loop, shared in zip(r["loops"], r["loop_shared"])]
        lines += [f"- machine code, loop {i}: " + ", ".join(f"{k} {v}" for k, v in loop.items())
                  for i, loop in enumerate(r["sass_loops"], 1)]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
