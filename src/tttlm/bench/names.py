"""Names the benchmarks share with their command line: step modes and report columns (kept
apart from the benchmarks so that ``tttlm bench`` parses its arguments without torch)."""

from __future__ import annotations

# Training-step modes of tttlm.bench.train: eager, compiled blocks, the whole step as a CUDA
# graph, or both.
STEP_MODES = ("eager", "compiled", "graph", "compiled-graph")

# How tttlm.bench.prefill runs the blocks, by --compile name: eager (False), compiled (True), or
# compiled with the TTT chunks over full caches replayed as a CUDA graph ("graphed").
BLOCK_MODES: dict[str, bool | str] = {"eager": False, "compiled": True, "graphed": "graphed"}
BLOCKS_LABEL: dict[bool | str, str] = {mode: name for name, mode in BLOCK_MODES.items()}

PREFILL_COLUMNS = ["variant", "path", "blocks", "attention", "sdpa", "tokens", "batch",
                   "micro_batch", "ttt_group", "s_per_1k_tokens", "tokens_per_s", "mfu",
                   "speedup_vs_full", "peak_gib", "error"]

TRAIN_COLUMNS = ["variant", "mode", "batch", "checkpoint_chunks", "s_median", "tokens_per_s",
                 "mfu", "ratio_vs_best_full", "peak_gib", "error"]
