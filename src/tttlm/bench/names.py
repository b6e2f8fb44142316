"""Names the benchmarks share with their command line: step modes and report columns (kept
apart from the benchmarks so that ``tttlm bench`` parses its arguments without torch)."""

from __future__ import annotations

# Training-step modes of tttlm.bench.train: eager, compiled blocks, the whole step as a CUDA
# graph, or both.
STEP_MODES = ("eager", "compiled", "graph", "compiled-graph")

# How tttlm.bench.prefill runs the blocks, by --compile name: eager (False) or compiled (True),
# each with the model's default for CUDA graphs of the TTT chunks over full caches
# (TTTForCausalLM.graph_chunks = None: where they win); compiled with those graphs always
# ("graphed") or never ("launched").
BLOCK_MODES: dict[str, bool | str] = {"eager": False, "compiled": True, "graphed": "graphed",
                                      "launched": "launched"}
# TTTForCausalLM.graph_chunks for each mode
GRAPH_CHUNKS: dict[bool | str, bool | None] = {"graphed": True, "launched": False}
BLOCKS_LABEL: dict[bool | str, str] = {mode: name for name, mode in BLOCK_MODES.items()}

PREFILL_COLUMNS = ["variant", "path", "blocks", "attention", "sdpa", "tokens", "batch",
                   "micro_batch", "ttt_group", "s_per_1k_tokens", "tokens_per_s", "mfu",
                   "speedup_vs_full", "peak_gib", "error"]

TRAIN_COLUMNS = ["variant", "mode", "batch", "checkpoint_chunks", "s_median", "tokens_per_s",
                 "mfu", "ratio_vs_best_full", "peak_gib", "error"]
