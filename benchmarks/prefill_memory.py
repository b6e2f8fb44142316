"""Peak memory of an e2e scoring prefill by TTT group size (``model.ttt_group``), on the CPU.

Each setting runs in a fresh process and reports its peak resident memory above what the
process held before the forward (``ru_maxrss``), its time and its loss (the same for every
group size: sequences are independent without an outer gradient). On a CPU the chunk attention
is the plain PyTorch path, which keeps ``[B, H, c, window + c]`` scores: this measures how memory
grows with the batch of sequences whose TTT chunks run together, not a GPU's numbers
(``tttlm bench prefill --ttt-groups`` measures those).

    python benchmarks/prefill_memory.py --preset 125m --batch 8 --length 2048 --groups all 4 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(preset: str, batch: int, length: int, group: int | None, vocab: int,
        path: str = "model") -> dict[str, float]:
    """The measurement itself (run in a fresh process by :func:`main`): the scoring forward
    (``model``) or ``Engine.prefill`` (``engine``, which also keeps a decoding state)."""
    import torch

    from tttlm import TTTConfig, TTTForCausalLM
    from tttlm.inference import Engine

    config = TTTConfig.from_preset(preset, variant="e2e", vocab_size=vocab, bos_token_id=1,
                                   eos_token_id=2)
    torch.manual_seed(0)
    model = TTTForCausalLM(config).eval()
    model.ttt_group = group
    x = torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    state_mib = 0.0
    with torch.no_grad():
        if path == "engine":
            logits, state = Engine(model).prefill(x[:, :-1])
            # the next token's NLL, a check that the two paths read the same prompt
            loss = float(torch.nn.functional.cross_entropy(logits.float(), x[:, -1]))
            state_mib = state.nbytes() / 2**20
        else:
            loss = float(model(x[:, :-1], x[:, 1:]).loss)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mib": (peak - before) / 1024, "seconds": seconds, "loss": loss,
            "state_mib": state_mib}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--groups", nargs="+", default=["all", "4", "1"])
    parser.add_argument("--paths", nargs="+", default=["model"], choices=["model", "engine"],
                        help="the scoring forward (model) and/or Engine.prefill (engine: its "
                             "loss column is the next token's NLL, its state_mib the decoding "
                             "state it keeps)")
    parser.add_argument("--vocab", type=int, default=4096,
                        help="vocabulary (small: the head is not what is measured)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/prefill_memory_cpu"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        group = None if args.one == "all" else int(args.one)
        print(json.dumps(one(args.preset, args.batch, args.length, group, args.vocab,
                             args.paths[0])))
        return 0
    rows = []
    for path in args.paths:
        for g in args.groups:
            done = subprocess.run(
                [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                 "--length", str(args.length), "--vocab", str(args.vocab), "--one", g,
                 "--paths", path],
                capture_output=True, text=True, check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            rows.append({"path": path, "ttt_group": g,
                         **json.loads(done.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    import torch

    command = "python benchmarks/prefill_memory.py " + " ".join(
        [f"--preset {args.preset}", f"--batch {args.batch}", f"--length {args.length}",
         "--groups", *args.groups, f"--vocab {args.vocab}"]
        + (["--paths", *args.paths] if args.paths != ["model"] else []))
    report = {"benchmark": "prefill_memory", "command": command,
              "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
              "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    whole = rows[0]
    lines = [f"# e2e scoring prefill: peak memory by TTT group size ({args.preset}, "
             f"{args.batch} × {args.length} tokens)", "",
             f"Command: `{command}`  ", f"Device: {report['device']}; torch "
             f"{report['versions']['torch']}, Python {report['versions']['python']}. Each "
             "row a fresh process; peak resident memory above the process's before the "
             "forward. On a CPU the chunk attention keeps its scores, so the numbers show how "
             "memory grows with the sequences whose TTT chunks run together, not a GPU's.", "",
             "| path | ttt_group | peak MiB | vs first row | state MiB | seconds | loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['ttt_group']} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] / whole['peak_mib']:.2f} | {r['state_mib']:.0f} | "
                     f"{r['seconds']:.1f} | {r['loss']:.6f} |")
    if "engine" in args.paths:
        lines += ["", "engine: `Engine.prefill`, which keeps each sequence's decoding state "
                  "(state MiB: window + chunk cache slots, preallocated, fast weights, inner "
                  "state) beside the prefill's own peak; its loss is the NLL of the token after "
                  "the prompt."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
