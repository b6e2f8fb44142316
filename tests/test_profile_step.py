"""``benchmarks/profile_step.py``'s kernel groups (the profile itself needs a GPU): names as
CUDA, cuBLAS, Inductor and our Triton kernels spell them land in the intended group."""

from __future__ import annotations

import pytest

from _helpers import load_benchmark


@pytest.fixture(scope="module")
def group():  # type: ignore[no-untyped-def]
    return load_benchmark("profile_step")._group


@pytest.mark.parametrize("name, expected", [
    ("_fwd_kernel", "chunk attention (Triton)"),
    ("_rows_kernel", "RoPE + cache operands (Triton)"),
    ("_window_fwd_kernel", "frozen chunk attention (Triton)"),
    ("_frozen_dq_kernel", "frozen chunk attention (Triton)"),
    ("_own_dkdv_kernel", "frozen chunk attention (Triton)"),
    ("_descend_in_place_kernel", "inner update (Triton)"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<80, 128>>",
     "flash / cuDNN / flex attention"),
    ("triton_tem_fused_0", "flash / cuDNN / flex attention"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("triton_poi_fused__to_copy_add_mul_0", "compiled, pointwise"),
    ("triton_red_fused__to_copy_mean_pow_1", "compiled, with a reduction"),
    ("triton_per_fused_cat_2", "compiled, with a reduction"),
    ("void at::native::elementwise_kernel<128, 2, ...>", "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>",
     "copy / cast / cat"),
    ("void at::native::reduce_kernel<512, 1, ...>", "reduction"),
])
def test_kernel_names_land_in_their_group(group, name: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    assert group(name) == expected
