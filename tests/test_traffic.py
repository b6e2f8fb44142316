"""``benchmarks/traffic.py``: the FLOPs and bytes it counts on fake tensors, against what the
model's shapes say (tiny preset; no memory or arithmetic is spent)."""

from __future__ import annotations

import pytest

from _helpers import load_benchmark
from tttlm.config import TTTConfig


@pytest.fixture(scope="module")
def traffic():  # type: ignore[no-untyped-def]
    return load_benchmark("traffic")


def test_full_attention_flops_are_the_linear_layers_and_head(traffic) -> None:  # type: ignore[no-untyped-def]
    c = TTTConfig.from_preset("tiny", variant="full")
    B, T = 2, 96
    counter = traffic.census("tiny", T, B, "full")
    flops = sum(v[2] for v in counter.by_op.values())
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    assert flops == 2 * B * T * (L * (4 * D * D + 3 * D * F) + V * D)
    assert sum(v[1] for v in counter.by_op.values()) > 0
    assert set(counter.by_region) == {"blocks", "eager"}


def test_prefill_forms_each_chunks_logits_once(traffic) -> None:  # type: ignore[no-untyped-def]
    """Without an outer gradient, a chunk's head runs one [N, V] product for the NLL and one
    for dx (chunks that take an inner step): no second product in a backward pass."""
    c = TTTConfig.from_preset("tiny")
    B, chunks = 2, 4
    counter = traffic.census("tiny", chunks * c.chunk_size, B)
    head = {k: v for k, v in counter.by_line.items()
            if "ops/linear_nll.py" in k or "head_nll" in k}
    assert not any(v[2] for k, v in head.items() if "backward of" in k)
    N, V, D = B * c.chunk_size, c.vocab_size, c.hidden_size
    assert sum(v[2] for v in head.values()) == 2 * N * V * D * (chunks + chunks - 1)
    result = traffic.report(counter, chunks * c.chunk_size, B, 1e12, 1e12, top=5)
    assert len(result["top_lines"]) == 5
    assert result["bound_s_per_1k"] == pytest.approx(
        result["matmul_s_per_1k"] + result["traffic_s_per_1k"])


def test_training_step_with_the_compiled_head(traffic) -> None:  # type: ignore[no-untyped-def]
    """``--what train --compiled``: the meta-gradient's head work is counted as the fused
    passes of linear_nll's compiled functions (no op-by-op softmax work left there), and the
    Markdown view puts two reports side by side."""
    eager = traffic.census("tiny", 128, 2, what="train")
    fused = traffic.census("tiny", 128, 2, what="train", compiled=True)
    names = {k.split("[")[-1].rstrip("]") for k in fused.by_line if "linear_nll.py" in k}
    assert {"fused _stats", "fused _dlogits", "fused _second"} <= names
    assert "exp_" not in names and "exp_" in {
        k.split("[")[-1].rstrip("]") for k in eager.by_line if "linear_nll.py" in k}
    # The same products, but for the Σ p·M reduction that eager runs as a batched product
    einsum = sum(v[2] for k, v in eager.by_line.items()
                 if "linear_nll.py" in k and k.endswith("[bmm]"))
    assert einsum > 0
    assert (sum(v[2] for v in fused.by_op.values())
            == sum(v[2] for v in eager.by_op.values()) - einsum)
    assert sum(v[1] for v in fused.by_op.values()) < sum(v[1] for v in eager.by_op.values())
    reports = [dict(traffic.report(c, 128, 2, 1e12, 1e12, top=50), label=label, what="train")
               for c, label in ((eager, "eager head"), (fused, "fused head"))]
    table = traffic.markdown(reports)
    assert table.splitlines()[0] == "|  | eager head | fused head |"
    assert "Largest lines outside the block code, fused head:" in table
