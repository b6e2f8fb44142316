"""Count the kernel-like ATen ops of one training step (forward + backward), e2e vs full.

Op counts do not depend on the widths, so a narrow model with the layer and chunk structure of
a real preset runs on a CPU and tells how many kernels a GPU step launches: at batch 1 the e2e
step is launch-bound when this count times ~10 µs is a large part of its time.

    python benchmarks/op_count.py --layers 12 --ttt-layers 3 --chunks 8
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from tttlm import TTTConfig, TTTForCausalLM

# Ops that only make views, allocate or dispatch, not kernels on a GPU.
_METADATA = {"aten::as_strided", "aten::view", "aten::resolve_conj", "aten::result_type",
             "aten::empty", "aten::empty_strided", "aten::_reshape_alias", "aten::_unsafe_view",
             "aten::empty_like", "aten::expand", "aten::t", "aten::transpose", "aten::permute",
             "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::alias",
             "aten::detach", "aten::lift_fresh", "aten::unfold", "aten::split", "aten::chunk",
             "aten::unflatten", "aten::reshape", "aten::flatten", "aten::contiguous",
             "aten::_to_copy", "aten::to", "aten::narrow", "aten::set_"}


def count(variant: str, layers: int, ttt_layers: int, chunks: int) -> dict[str, object]:
    chunk = 64
    config = TTTConfig(vocab_size=256, hidden_size=96, num_layers=layers, num_heads=12,
                       intermediate_size=128, variant=variant, window=chunk * chunks,
                       chunk_size=chunk, num_ttt_layers=ttt_layers if variant == "e2e" else None)
    torch.manual_seed(0)
    model = TTTForCausalLM(config)
    x = torch.randint(0, 256, (1, chunk * chunks + 1))
    model(x[:, :-1], labels=x[:, 1:]).loss.backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x[:, :-1], labels=x[:, 1:]).loss.backward()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = [e for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    kernels = [e for e in leaves if e.name not in _METADATA]
    return {"variant": variant, "kernel_like_ops": len(kernels), "leaf_ops": len(leaves),
            "top": Counter(e.name for e in kernels).most_common(8)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ttt-layers", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args()
    for variant in ("e2e", "full"):
        print(json.dumps(count(variant, args.layers, args.ttt_layers, args.chunks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
