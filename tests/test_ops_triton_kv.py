"""Which tensors the attention kernels read through tensor descriptors, and when they do
(tttlm.ops.triton_kv); the kernels' results through descriptors are tested with each kernel
(test_ops_triton_window_fwd, test_ops_frozen_dq, test_ops_triton_own_dkdv)."""

from __future__ import annotations

import pytest
import torch

from _helpers import triton_or_skip

triton = triton_or_skip()

from tttlm.ops.triton_kv import descriptors_apply, use_descriptors  # noqa: E402


def test_which_layouts_descriptors_read() -> None:
    kv = torch.zeros(2, 40, 2, 3, 80, dtype=torch.bfloat16)
    assert descriptors_apply(torch.zeros(2, 40, 3, 80, dtype=torch.bfloat16))
    assert descriptors_apply(kv[:, :, 0], kv[:, :, 1])  # views of a fused projection
    assert descriptors_apply(kv[:, 8:, 0])  # rows from 8 on: still 16-byte aligned
    assert not descriptors_apply(kv[:, :, :, 0])  # heads apart
    assert not descriptors_apply(kv[:, :, 0, :, :72])  # rows not contiguous to the next head
    odd = torch.zeros(2 * 40 * 3 * 80 + 1, dtype=torch.bfloat16)[1:].view(2, 40, 3, 80)
    assert not descriptors_apply(odd)  # an address off 16 bytes
    wide = torch.zeros(2, 40, 3, 84, dtype=torch.bfloat16)[..., :80]
    assert not descriptors_apply(wide)


def test_when_a_kernel_takes_them_off_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU (the interpreter) only when asked, whatever the environment says; asked for a
    layout they cannot read: refused."""
    t = torch.zeros(2, 40, 3, 80)
    for env in ("", "0", "1"):
        monkeypatch.setenv("TTTLM_KV_DESC", env)
        assert not use_descriptors(None, t, t, whole_sequence=True)
    assert use_descriptors(True, t, t) and not use_descriptors(False, t, t)
    with pytest.raises(ValueError, match="descriptors"):
        use_descriptors(True, t[:, :, :, :72])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default rule is a GPU's")
def test_when_a_kernel_takes_them_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole sequences and several sequences' chunks: yes; one sequence's chunk launched
    outside a graph: no, inside one: yes; TTTLM_KV_DESC=0 / 1: never / always."""
    monkeypatch.delenv("TTTLM_KV_DESC", raising=False)
    one = torch.zeros(1, 40, 3, 80, device="cuda", dtype=torch.bfloat16)
    two = torch.zeros(2, 40, 3, 80, device="cuda", dtype=torch.bfloat16)
    assert use_descriptors(None, one, one, whole_sequence=True)
    assert use_descriptors(None, two, two)
    assert not use_descriptors(None, one, one)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert use_descriptors(None, one, one)
    monkeypatch.setenv("TTTLM_KV_DESC", "0")
    assert not use_descriptors(None, two, two, whole_sequence=True)
    monkeypatch.setenv("TTTLM_KV_DESC", "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert use_descriptors(None, one, one)
