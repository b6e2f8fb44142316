"""The Triton pass for a frozen chunk's attention operands (tttlm.ops.triton_rope) against its
reference, tttlm.ops.rope.frozen_chunk_operands' eager path: the copies (values, next keys)
bit for bit, the rotations and the gradients of q, k and v within one rounding (the reference's
complex product contracts some products into FMAs, depending on the vector path it takes, so
neither side is "the" rounding), and the fp64 gradient check.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import triton_or_skip

triton = triton_or_skip()

from tttlm.ops import rope  # noqa: E402
from tttlm.ops.rope import rope_angles  # noqa: E402
from tttlm.ops.triton_rope import (  # noqa: E402
    triton_frozen_operands,
    triton_operands_can_run,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B: int, past: int, c: int, H: int, d: int, window: int, dtype: torch.dtype,
            seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    # q, k, v as views of one projection (rows of 3 × H × d), as the blocks make them
    qkv = rand(B, c, 3, H, d)
    q, k, v = qkv.unbind(2)
    keys, values = rand(B, past, H, d), rand(B, past, H, d)
    table = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = rope_angles(torch.arange(window - past, window + c, device=DEVICE), d, 10000.0,
                           table)
    return q, keys, k, values, v, cos, sin


CASES = [  # B, past, c, H, d, window (keep): growing cache, full cache, rows straddling blocks
    (2, 6, 5, 3, 8, 16),
    (1, 16, 4, 2, 10, 16),
    (3, 9, 7, 2, 6, 12),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_the_reference(case: tuple[int, ...], dtype: torch.dtype) -> None:
    B, past, c, H, d, window = case
    q, keys, k, values, v, cos, sin = _inputs(B, past, c, H, d, window, dtype)
    assert triton_operands_can_run(q, keys, k, values, v, cos)
    got = triton_frozen_operands(q, keys, k, values, v, cos, sin, window)
    want = rope._frozen_operands(q, keys, k, values, v, cos, sin, window)
    for name, a, b in zip(("queries", "keys", "values", "next keys"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name in ("values", "next keys"):
            assert torch.equal(a, b), name
        else:  # default tolerances: within a rounding of the dtype (a wrong angle is O(1))
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("case", CASES[:2])
def test_gradients_equal_the_reference(case: tuple[int, ...]) -> None:
    B, past, c, H, d, window = case
    q, keys, k, values, v, cos, sin = _inputs(B, past, c, H, d, window, torch.bfloat16, 1)
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(B, n, H, d, generator=g).to(DEVICE, torch.bfloat16)
             for n in (c, past + c, past + c)]

    def run(fn):  # noqa: ANN001, ANN202
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = fn(leaves[0], keys, leaves[1], values, leaves[2], cos, sin, window)
        torch.autograd.backward(out[:3], grads)
        return [t.grad for t in leaves]

    for name, a, b in zip("qkv", run(triton_frozen_operands), run(rope._frozen_operands)):
        if name == "v":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, msg=name)


def test_backward_makes_no_gradient_for_the_kept_keys() -> None:
    """The raw keys kept for the next chunk take no gradient: the backward is handed none,
    rather than a tensor of zeros of their shape (autograd's default for an output marked
    non-differentiable: a fill as large as the cache, 42 MB a TTT block and chunk at 3b)."""
    B, past, c, H, d, window = 2, 6, 5, 3, 8, 16
    q, keys, k, values, v, cos, sin = _inputs(B, past, c, H, d, window, torch.float32, 4)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = triton_frozen_operands(leaves[0], keys, leaves[1], values, leaves[2], cos, sin,
                                 window)
    kept = tuple(out[3].shape)
    loss = sum(o.sum() for o in out[:3])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        loss.backward()
    fills = [e.name for e in prof.events()
             if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_")
             and any(tuple(s) == kept for s in e.input_shapes if s)]
    assert not fills, fills
    assert all(t.grad is not None and t.grad.isfinite().all() for t in leaves)


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_cache_swap_reads_one_set_and_writes_the_other(case: tuple[int, ...],
                                                       parity: int) -> None:
    """With the cache in two buffer sets (:class:`~tttlm.ops.cache_swap.CacheSwap`), the pass
    reads the set the device's parity names and writes the next cache into the other: the
    outputs and gradients are those of the one-set pass over that set's cache, the next keys
    and values land in the other set bit for bit, and the set read is left as it was; the
    same for the torch path (``rope.frozen_chunk_operands`` on a CPU)."""
    from tttlm.ops.cache_swap import CacheSwap

    B, past, c, H, d, window = case
    q, keys, k, values, v, cos, sin = _inputs(B, past, c, H, d, window, torch.float32, 5)
    n2 = min(past + c, window)
    g = torch.Generator().manual_seed(6)
    # two sets, each a full window's buffer; this chunk's cache is the first ``past`` rows
    full = [[torch.randn(B, window, H, d, generator=g).to(DEVICE) for _ in range(2)]
            for _ in range(2)]  # [keys sets, values sets]
    full[0][parity][:, :past] = keys
    full[1][parity][:, :past] = values
    swap = CacheSwap(keys=(full[0][0][:, :past], full[0][1][:, :past]),
                     values=(full[1][0][:, :past], full[1][1][:, :past]),
                     next_keys=(full[0][0][:, :n2], full[0][1][:, :n2]),
                     next_values=(full[1][0][:, :n2], full[1][1][:, :n2]),
                     parity=torch.tensor([parity], dtype=torch.int32, device=DEVICE))
    grads = [torch.randn(B, n, H, d, generator=g).to(DEVICE) for n in (c, past + c, past + c)]

    def run(fn, **kw):  # noqa: ANN001, ANN003, ANN202
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = fn(leaves[0], kw.pop("keys", keys), leaves[1], kw.pop("values", values),
                 leaves[2], cos, sin, window, **kw)
        torch.autograd.backward(out[:3], grads)
        return [o.detach() for o in out[:3]], [t.grad for t in leaves], out[3]

    for fn in (triton_frozen_operands, rope.frozen_chunk_operands):
        want, want_grads, want_kept = run(fn)  # one set: the same function over ``keys``
        want_next_v = want[2][:, past + c - n2:]
        before = [t.clone() for t in (*full[0], *full[1])]
        got, got_grads, kept = run(fn, keys=swap.keys[0], values=swap.values[0], swap=swap)
        assert kept is None
        for a, b in zip((*got, *got_grads), (*want, *want_grads)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        other = 1 - parity
        assert torch.equal(full[0][other][:, :n2], want_kept)
        assert torch.equal(full[1][other][:, :n2], want_next_v)
        assert torch.equal(full[0][parity], before[parity])
        assert torch.equal(full[1][parity], before[2 + parity])
        # rows past the next cache's untouched in the set written
        assert torch.equal(full[0][other][:, n2:], before[other][:, n2:])
        full[0][other].copy_(before[other])
        full[1][other].copy_(before[2 + other])


# Compiles the pass for sm_90a and prints the PTX's 16-byte loads and stores, one JSON line
# per SWAP. In a process of its own without TRITON_INTERPRET: in the test process the
# interpreter swaps triton.language's builtins while it runs a kernel, and a compile that
# meets them fails (seen once in the suite, as an interpreter error from the code generator).
_COMPILE_SM90 = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tttlm.ops import triton_rope

fn = triton_rope._rows_kernel  # (it calls no other jitted function)
pointers = {"X": "*bf16", "ROT": "*bf16", "RAW": "*bf16", "V": "*bf16", "VOUT": "*bf16",
            "VNEXT": "*bf16", "COS": "*fp32", "SIN": "*fp32", "PARITY": "*i32"}
for swap in (False, True):
    consts = dict(HALF=40, WRITE_RAW=True, WRITE_VALUES=True, WRITE_VNEXT=swap, SWAP=swap,
                  BLOCK_R=8, BLOCK_E=512)
    sig = {n: "constexpr" if n in consts else pointers.get(n, "i64" if n.endswith("_alt")
                                                          else "i32") for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if n not in consts and n not in ("dst0", "drop", "n")}
    try:
        kernel = triton.compile(ASTSource(fn, sig, consts, aligned),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4, "enable_fp_fusion": True})
    except RuntimeError as e:  # (a wheel without ptxas for this machine)
        print(json.dumps({"skip": str(e)}))
        sys.exit(0)
    ptx = kernel.asm["ptx"]
    print(json.dumps({"swap": swap,
                      "loads": len(re.findall(r"ld\\.global[.\\w]*\\.v4", ptx)),
                      "stores": len(re.findall(r"st\\.global[.\\w]*\\.v4", ptx))}))
"""


@pytest.fixture(scope="module")
def hopper_vectors() -> dict[bool, dict[str, int]]:
    """The 16-byte accesses of the pass compiled for sm_90a, by ``SWAP``."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if lines and "skip" in lines[0]:
        pytest.skip(f"no sm_90a compile here: {lines[0]['skip']}")
    return {line["swap"]: line for line in lines}


@pytest.mark.parametrize("swap", [False, True])
def test_pass_compiles_for_hopper_with_vector_accesses(
        swap: bool, hopper_vectors: dict[bool, dict[str, int]]) -> None:
    """The interpreter runs the kernel's Python, not its compiled form: compiled for sm_90a
    (what the prefill runs on), with and without the two buffer sets, rows are still read and
    written as 16-byte vectors when the JIT marks pointers, strides and the sets' distances
    multiples of 16 (moving a base pointer by ``parity × distance`` keeps that known)."""
    got = hopper_vectors[swap]
    assert got["loads"] >= 16
    assert got["stores"] >= (16 if swap else 12)


def test_gradcheck_fp64() -> None:
    B, past, c, H, d, window = 2, 3, 2, 1, 4, 4  # small: each evaluation is a kernel launch
    q, keys, k, values, v, cos, sin = _inputs(B, past, c, H, d, window, torch.float64, 3)
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return triton_frozen_operands(q, keys, k, values, v, cos, sin, window)[:3]

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def test_a_cache_that_wants_gradients_is_left_to_the_reference() -> None:
    q, keys, k, values, v, cos, sin = _inputs(1, 4, 4, 2, 8, 8, torch.float32)
    assert not triton_operands_can_run(q, keys.requires_grad_(True), k, values, v, cos)
    # transformers' half layout (tables as wide as the head) has no Triton pass
    assert not triton_operands_can_run(q, keys.detach(), k, values, v, torch.cat((cos, cos), -1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model takes the pass on CUDA")
def test_model_evaluation_with_the_pass_matches_the_reference_on_cuda(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole no-gradient forward (fp32, window 12 < 40 tokens: the cache fills and rolls)
    with the Triton pass, against the same forward with the reference's operands."""
    from _helpers import tiny_model, tokens

    model = tiny_model(dtype=torch.float32, head_dim=8).cuda()
    x, y = (t.cuda() for t in tokens(model, 3, 40))
    with torch.no_grad():
        fast = model(x, labels=y).token_nll
        monkeypatch.setattr(rope, "triton_available", lambda: False)
        reference = model(x, labels=y).token_nll
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
