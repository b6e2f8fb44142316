"""``benchmarks/kernel_sm90.py``'s reading of what it compiles (the compile itself takes a
minute; its report is committed): the arguments' types and divisibility, and each loop's
sequence of tensor-core products, waits and exponentials in a PTX text."""

from __future__ import annotations

import pytest

from _helpers import load_benchmark, triton_or_skip

triton_or_skip()


@pytest.fixture(scope="module")
def tool():  # type: ignore[no-untyped-def]
    return load_benchmark("kernel_sm90")


def test_signature_types_the_kernel_arguments(tool) -> None:  # type: ignore[no-untyped-def]
    fn = tool.triton_window_fwd._window_fwd_kernel
    consts = dict(BM=128, BN=64, DA=64, DB=16, HAS_WINDOW=True, DESC=False)
    sig, constants, attrs = tool._signature(fn, consts)
    names = fn.arg_names
    assert sig["Q"] == sig["KA"] == "*bf16" and sig["LSE"] == "*fp32"
    assert sig["H"] == sig["WINDOW"] == sig["sq_t"] == "i32" and sig["scale"] == "fp32"
    assert {names[i]: v for (i,), v in constants.items()} == consts
    assert all(sig[n] == "constexpr" for n in consts)
    # every pointer and integer is marked a multiple of 16, the float and constants are not
    marked = {names[i] for (i,) in attrs}
    assert marked == {n for n in names if n not in consts and n != "scale"}


PTX = """\
$L__BB0_2:
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
	wgmma.wait_group.sync.aligned 0;
	ex2.approx.ftz.f32 %f1, %f2;
	ex2.approx.ftz.f32 %f3, %f4;
	wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {...};
	@%p1 bra 	$L__BB0_2;
$L__BB0_3:
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
	@%p2 bra 	$L__BB0_5;
$L__BB0_5:
	ret;
"""


def test_loops_are_read_from_the_ptx(tool) -> None:  # type: ignore[no-untyped-def]
    # one loop (the branch back to $L__BB0_2); the forward branch to $L__BB0_5 is not one
    assert tool._loops(PTX) == [["mma m64n64k16 x2", "wait", "ex2 x2", "mma m64n16k16"]]


def test_loop_shared_work_counts_each_loop(tool) -> None:  # type: ignore[no-untyped-def]
    ptx = PTX.replace("\tex2.approx.ftz.f32 %f1, %f2;\n",
                      "\tex2.approx.ftz.f32 %f1, %f2;\n\tbar.sync 0;\n"
                      "\tstmatrix.sync.aligned.m8n8.x4.shared.b16 [%r1], {...};\n"
                      "\tbar.sync 0;\n\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {...}, [%r1];\n")
    assert tool._loop_shared(ptx) == [{"bar.sync": 2, "stmatrix": 1, "ldmatrix": 1}]
    assert tool._loop_shared(PTX) == [{"bar.sync": 0, "stmatrix": 0, "ldmatrix": 0}]
    assert tool._loops(ptx) == tool._loops(PTX)


def test_signature_types_the_meta_training_kernels(tool) -> None:  # type: ignore[no-untyped-def]
    from tttlm.ops import triton_chunk_attention as tca

    fn = tca._dbl_dkdv_kernel
    consts = dict(D=64, HAS_WINDOW=True, SKIP=True, ACC="fp32", PREC="tf32", BM=32, BN=64,
                  BD=64)
    sig, _, _ = tool._signature(fn, consts)
    assert sig["QP"] == sig["KP"] == "*i64"
    assert sig["LSE"] == sig["DR"] == sig["DBAR"] == sig["CR"] == "*fp32"
    assert sig["Q"] == sig["GK"] == sig["KB"] == "*bf16"
    assert sig["Tq"] == sig["Tk"] == sig["H"] == sig["window"] == sig["s_t"] == "i32"
    assert set(tool.TRAIN_CONFIG) == set(tool.TRAIN_KERNELS)
    assert all(name in tca.CONFIGS for name in tool.TRAIN_CONFIG.values())


SASS = """\
        /*0100*/                   MOV R1, c[0x0][0x28] ;             /* 0x00000a0000017a02 */
        /*0110*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;      /* 0x0000000000007b1d */
        /*0120*/                   FSETP.GT.AND P1, PT, R10, 8, PT ;  /* 0x4100000000007b1d */
        /*0130*/               @!P1 BRA 0x150 ;                       /* 0x0000000000007b1d */
        /*0140*/                   MUFU.EX2 R7, R7 ;                  /* 0x0000000000007b1d */
        /*0150*/                   MUFU.EX2 R8, R8 ;                  /* 0x0000000000007b1d */
        /*0160*/               @!P0 BRA 0x110 ;                       /* 0x0000000000007b1d */
        /*0170*/                   EXIT ;                             /* 0x0000000000007b1d */
"""


def test_sass_loops_count_instructions_exponentials_and_skips(tool) -> None:  # type: ignore[no-untyped-def]
    # one loop, 0x110..0x160: six instructions, two MUFU.EX2, one branch over a part of it
    assert tool._sass_loops(SASS) == [{"instructions": 6, "mufu_ex2": 2,
                                       "forward_branches": 1, "barriers": 1}]
    assert tool._sass_loops("") == []
