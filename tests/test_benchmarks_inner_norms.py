"""benchmarks/inner_norms.py on a CPU: its foreach pass gives each sequence's norm of each
tensor as ``tensor_norms`` does (the script times the two on a GPU), and without a GPU it says
so in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _helpers import load_benchmark
from tttlm.ttt.inner import tensor_norms


def test_foreach_norms_are_the_per_tensor_norms() -> None:
    inner_norms = load_benchmark("inner_norms")
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 24, 40, generator=gen).to(torch.bfloat16) * (i + 1)
             for i in range(3)]
    got = inner_norms.foreach_norms(grads)
    assert got.shape == (3, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, tensor_norms(grads), rtol=1e-6, atol=0)
    # each sequence's rows alone: the second sequence's norm does not see the first's rows
    grads[0][1].zero_()
    zeroed = inner_norms.foreach_norms(grads)
    assert zeroed[0, 1] == 0 and zeroed[0, 0] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the script runs on a GPU")
def test_without_a_gpu_it_says_so(capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    inner_norms = load_benchmark("inner_norms")
    assert inner_norms.main(["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["inner_norms: error: needs a CUDA device; run it on a GPU"]
