"""RoPE as torch.compile runs it (tttlm.ops.rope.apply_rope's compiled form, both layouts):
the real form's products and sums exactly (Inductor's C++ kernels contract no products into
FMAs), and one pass that writes only the output. Written with torch.stack / torch.cat, Inductor
wrote the rotated halves in fp32 and cast them in a second pass, about three times the bytes
(3.4 ms a block for 3b's queries and keys at 128K rows on an H100)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from tttlm.ops.rope import apply_rope, rope_angles

T, H, D = 24, 3, 80


def _real_form(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eager, the products and sums written out (the interleaved pairs, or transformers'
    ``x * cos + rotate_half(x) * sin``)."""
    xf = x.to(cos.dtype)
    if cos.shape[-1] == x.shape[-1]:
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]).to(x.dtype)
    re_, im = xf.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None], sin[:, None]
    return torch.stack((re_ * c - im * s, re_ * s + im * c), -1).flatten(-2).to(x.dtype)


def _buffers(code: str) -> list[tuple[int, str]]:
    """(elements, dtype) of every buffer the generated wrapper allocates."""
    found = re.findall(r"empty_strided_cpu\(\(([\d, ]*)\), \([\d, ]*\), torch\.(\w+)\)", code)
    return [(math.prod(int(n) for n in shape.split(",") if n.strip()), dtype)
            for shape, dtype in found]


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_rope_is_the_real_form_in_one_pass(layout: str, dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, H, D, generator=g).to(dtype)
    cos, sin = rope_angles(torch.arange(100, 100 + T), D, 10000.0, layout=layout)
    got, codes = run_and_get_code(torch.compile(apply_rope), x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, _real_form(x, cos, sin))
    # the eager path (a complex product for interleaved pairs) within one rounding
    want = apply_rope(x.double(), cos.double(), sin.double())
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()
    buffers = [b for code in codes for b in _buffers(code)]
    assert buffers == [(x.numel(), str(dtype).removeprefix("torch."))], buffers


def test_compiled_rope_gradient_matches_eager() -> None:
    """Training compiles it with a backward: the gradient is the eager one (fp64)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    for layout in ("interleaved", "half"):
        x = torch.randn(2, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
        cos, sin = rope_angles(torch.arange(T), D, 10000.0, torch.float64, layout=layout)
        up = torch.randn(2, T, H, D, generator=g, dtype=torch.float64)
        want, = torch.autograd.grad((apply_rope(x, cos, sin) * up).sum(), x)
        got, = torch.autograd.grad((torch.compile(apply_rope)(x, cos, sin) * up).sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
