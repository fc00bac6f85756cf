"""The pure-Python parts of tools/sass_report.py, on hand-written cuobjdump/ptxas text (no nvcc, no GPU)."""
import importlib.util
import pathlib
import shutil

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "tools" / "sass_report.py"
_spec = importlib.util.spec_from_file_location("sass_report", _PATH)
sr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sr)

NS = "_ZN4fsce4cuda43_GLOBAL__N__4861de29_10_kernels_cu_b3b749b5"
# rows_kernel<bf16, 256, forward, identity, no stats> and <bf16, 32, backward, identity, no stats>
FWD = NS + "11rows_kernelI13__nv_bfloat16Li256ELi0ELi0ELb0EEEvNS_8CEParamsE"
BWD = NS + "11rows_kernelI13__nv_bfloat16Li32ELi2ELi0ELb0EEEvNS_8CEParamsE"

# Shaped like `cuobjdump -sass`: an encoding comment under each instruction,
# `BRA 0x180;` with no space, the trap after EXIT, NOP padding.
SASS = f"""
	code for sm_90
		Function : {FWD}
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
                                                                             /* 0x000fe20000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                      /* 0x0000000000007919 */
        /*0020*/                   MOV R2, RZ ;                            /* 0x000000ff00027202 */
        /*0030*/                   IADD3 R3, R2, 0x1, RZ ;                 /* 0x0000000102037810 */
        /*0040*/                   LDG.E.128 R4, desc[UR4][R8.64] ;        /* 0x0000000408047981 */
        /*0050*/                   LDG.E.128 R12, desc[UR4][R8.64+0x1000] ; /* 0x00100004080c7981 */
        /*0060*/                   FSETP.GEU.AND P4, PT, R7, R26, PT ;     /* 0x0000001a0700720b */
        /*0070*/              @!P4 MUFU.EX2 R24, R25 ;                     /* 0x0000001900188308 */
        /*0080*/                   BSSY B1, 0xc0 ;                         /* 0x0000003000017945 */
        /*0090*/              @!P3 BRA 0xc0 ;                              /* 0x0000000000088947 */
        /*00a0*/                   LDG.E.U16 R13, desc[UR6][R20.64+0x6] ;  /* 0x00000606140d7981 */
        /*00b0*/                   FFMA R5, R31, R12, R5 ;                 /* 0x0000000c1f057223 */
        /*00c0*/                   BSYNC B1 ;                              /* 0x0000000000017941 */
        /*00d0*/                   FADD R6, R6, R12 ;                      /* 0x0000000c06067221 */
        /*00e0*/                   ISETP.GE.U32.AND P0, PT, R17, R2, PT ;  /* 0x000000021100720c */
        /*00f0*/              @!P0 BRA 0x30 ;                              /* 0xfffffffc00e08947 */
        /*0100*/                   IADD3 R2, R2, 0x1, RZ ;                 /* 0x0000000102027810 */
        /*0110*/                   ISETP.NE.AND P1, PT, R2, R3, PT ;       /* 0x000000030200720c */
        /*0120*/               @P1 BRA 0x20 ;                              /* 0xfffffff800f01947 */
        /*0130*/                   LDG.E.U16 R4, desc[UR4][R8.64] ;        /* 0x0000000408047981 */
        /*0140*/                   FADD R6, R6, R4 ;                       /* 0x0000000406067221 */
        /*0150*/                   NOP;                                    /* 0x0000000000007918 */
        /*0160*/               @P1 BRA 0x130 ;                             /* 0xfffffffc00f01947 */
        /*0170*/                   EXIT ;                                  /* 0x000000000000794d */
        /*0180*/                   BRA 0x180;                              /* 0xfffffffc00fc7947 */
        /*0190*/                   NOP;                                    /* 0x0000000000007918 */
		..........


		Function : {BWD}
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;        /* 0x0000000402047981 */
        /*0010*/                   LDL R9, [R1+0x4] ;                      /* 0x0000040001097983 */
        /*0020*/                   FMUL R4, R4, R9 ;                       /* 0x0000000904047220 */
        /*0030*/                   STG.E.128 desc[UR4][R10.64], R4 ;       /* 0x000000040a007986 */
        /*0040*/               @P0 BRA 0x0 ;                               /* 0xfffffffc00f00947 */
        /*0050*/                   STG.E.128 desc[UR4][R10.64], RZ ;       /* 0x000000ff0a007986 */
        /*0060*/               @P1 BRA 0x50 ;                              /* 0xfffffffc00f01947 */
        /*0070*/                   EXIT ;                                  /* 0x000000000000794d */
        /*0080*/                   BRA 0x80;                               /* 0xfffffffc00fc7947 */
"""

PTXAS = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{FWD}' for 'sm_90'
ptxas info    : Function properties for {FWD}
    24 bytes stack frame, 28 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 24 bytes cumulative stack size, 128 bytes smem
ptxas info    : Compile time = 191.010 ms
ptxas info    : Compiling entry function '{BWD}' for 'sm_90'
ptxas info    : Function properties for {BWD}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 160 registers, used 1 barriers
"""


def elf(bounds):
    return "\n".join(f""".nv.info.{name}
	<0x7>
	Attribute:	EIATTR_MAX_THREADS
	Format:	EIFMT_SVAL
	Value:	{hex(threads)} 0x1 0x1 
	<0x8>
	Attribute:	EIATTR_CRS_STACK_SIZE""" for name, threads in bounds.items())


def test_parse_sass_functions_and_instructions():
    funcs = sr.parse_sass(SASS)
    assert list(funcs) == [FWD, BWD]
    fwd = funcs[FWD]
    assert [i.addr for i in fwd] == list(range(0, 0x1a0, 0x10))
    back = fwd[0xF]
    assert (back.pred, back.op, sr.branch_target(back)) == ("@!P0", "BRA", 0x30)
    assert sr.branch_target(fwd[0x18]) == 0x180  # "BRA 0x180;" with no space
    assert sr.branch_target(fwd[0x8]) is None  # BSSY names an address but is no branch


def test_loops_innermost_and_trap():
    fwd = sr.parse_sass(SASS)[FWD]
    loops = sr.find_loops(fwd)
    # the inner vector loop, the outer loop around it, the scalar loop; not the trap after EXIT
    assert loops == [sr.Loop(0x20, 0x120), sr.Loop(0x30, 0xF0), sr.Loop(0x130, 0x160)]
    assert sr.innermost(loops) == [sr.Loop(0x30, 0xF0), sr.Loop(0x130, 0x160)]


def test_back_edges_to_one_header_make_one_loop():
    instrs = [sr.Instr(0x0, "", "FADD", "R0, R0, R1"), sr.Instr(0x10, "@P0", "BRA", "0x0"),
              sr.Instr(0x20, "", "FADD", "R0, R0, R1"), sr.Instr(0x30, "@P1", "BRA", "0x0")]
    assert sr.find_loops(instrs) == [sr.Loop(0x0, 0x30)]


def test_read_loop_counts_vector_loads_and_skips_the_weight_path():
    fwd = sr.parse_sass(SASS)[FWD]
    s = sr.loop_stats(fwd, sr.Loop(0x30, 0xF0), element_bytes=2)
    # two unconditional 16-byte loads of bf16; the 2-byte weight load behind @!P3 BRA is not an element
    assert (s.kind, s.elements, s.scalar) == ("read", 16, False)
    assert s.instructions == 13
    # plain path: 0x30..0x90, then the branch over the weight read to 0xc0..0xf0
    assert s.path == 11
    assert s.per_element == pytest.approx(11 / 16)
    assert s.local_accesses == 0


def test_scalar_loop_ignores_nops_and_is_marked():
    fwd = sr.parse_sass(SASS)[FWD]
    s = sr.loop_stats(fwd, sr.Loop(0x130, 0x160), element_bytes=2)
    assert (s.kind, s.elements, s.scalar, s.instructions, s.path) == ("read", 1, True, 3, 3)


def test_fp32_elements_from_the_same_loads():
    fwd = sr.parse_sass(SASS)[FWD]
    assert sr.loop_stats(fwd, sr.Loop(0x30, 0xF0), element_bytes=4).elements == 8


def test_write_fill_and_local_memory():
    bwd = sr.parse_sass(SASS)[BWD]
    write = sr.loop_stats(bwd, sr.Loop(0x0, 0x40), element_bytes=2)
    fill = sr.loop_stats(bwd, sr.Loop(0x50, 0x60), element_bytes=2)
    assert (write.kind, write.elements, write.local_accesses, write.path) == ("write", 8, 1, 5)
    assert (fill.kind, fill.elements) == ("fill", 8)
    assert sr.steady_state([fill, write], "write") is write
    assert sr.steady_state([fill, write], "read") is None


def test_write_loop_reading_shared_memory_is_no_fill():
    # a row kept in shared memory: the gradient pass loads with LDS and stores with STG
    body = [sr.Instr(0x0, "", "LDS.128", "R4, [R2]"),
            sr.Instr(0x10, "", "STG.E.64", "desc[UR4][R10.64], R4"),
            sr.Instr(0x20, "@P0", "BRA", "0x0")]
    s = sr.loop_stats(body, sr.Loop(0x0, 0x20), element_bytes=2)
    assert (s.kind, s.elements, s.path) == ("write", 4, 3)


def test_predicated_branch_over_plain_code_is_not_taken():
    # if/else on data (no global read on either side): the plain path runs the
    # fall-through side, then the unconditional branch skips the other side.
    body = [sr.Instr(0x0, "", "FSETP.GT.AND", "P0, PT, R0, R1, PT"),
            sr.Instr(0x10, "@P0", "BRA", "0x40"),
            sr.Instr(0x20, "", "MUFU.EX2", "R2, R3"),
            sr.Instr(0x30, "", "BRA", "0x50"),
            sr.Instr(0x40, "", "FMUL", "R2, R3, R3"),
            sr.Instr(0x50, "", "LDG.E.128", "R4, desc[UR4][R8.64]"),
            sr.Instr(0x58, "", "LDG.E.U16", "R9, desc[UR4][R12.64]"),  # a weight, read unconditionally
            sr.Instr(0x60, "@P1", "BRA", "0x0")]
    s = sr.loop_stats(body, sr.Loop(0x0, 0x60), element_bytes=2)
    assert s.path == 7  # 0x0, 0x10, 0x20, 0x30, 0x50, 0x58, 0x60
    assert (s.kind, s.elements) == ("read", 8)  # the 16-byte load after the if/else; not the narrower weight


@pytest.mark.parametrize("op,size", [("LDG.E.128", 16), ("LDG.E.LTC128B.128", 16), ("LDG.E.64", 8),
                                     ("LDG.E", 4), ("LDG.E.CONSTANT", 4), ("LDG.E.U16", 2),
                                     ("STG.E.U8", 1), ("LDG.E.S16", 2)])
def test_access_bytes(op, size):
    assert sr.access_bytes(op) == size


def test_parse_ptxas():
    res = sr.parse_ptxas(PTXAS)
    assert res[FWD] == sr.Resources(registers=48, spill_stores=28, spill_loads=20, stack=24, smem=128)
    assert res[BWD] == sr.Resources(registers=160, spill_stores=0, spill_loads=0, stack=0, smem=0)


@pytest.mark.parametrize("regs,smem,threads,blocks,limiter", [
    (32, 0, 256, 8, "registers"),  # 32 regs x 256 threads = 8192; 65536 / 8192 = 8 (threads: 8 too)
    (48, 128, 256, 5, "registers"),  # 48 x 32 = 1536 per warp; 65536 / (1536 x 8) = 5.3
    (127, 0, 256, 2, "registers"),  # 127 -> 128 per thread: 4096 per warp
    (64, 0, 1024, 1, "registers"),
    (33, 0, 1024, 1, "registers"),  # 33 -> 40 per thread: 1280 x 32 = 40960 per block
    (16, 0, 32, 32, "blocks"),
    (16, 0, 512, 4, "threads"),
    (32, 100 * 1024, 256, 2, "smem"),  # (100 KiB + 1 KiB reserved) per block in 228 KiB
])
def test_resident_blocks(regs, smem, threads, blocks, limiter):
    assert sr.resident_blocks(regs, smem, threads) == (blocks, limiter)


def test_resident_blocks_rejects_unlaunchable_blocks():
    with pytest.raises(ValueError, match="cannot launch"):
        sr.resident_blocks(32, 228 * 1024, 256)
    with pytest.raises(ValueError, match="cannot launch"):
        sr.resident_blocks(32, 0, 2048)


@pytest.mark.parametrize("demangled,name,args", [
    ("void fsce::cuda::(anonymous namespace)::rows_kernel<__nv_bfloat16, 256, 0, 0, false>(fsce::CEParams)",
     "rows_kernel", ["__nv_bfloat16", 256, 0, 0, "false"]),
    ("void fsce::cuda::(anonymous namespace)::rows_kernel<float, 32, "
     "(fsce::cuda::(anonymous namespace)::Phase)2, 1, true>(fsce::CEParams)", "rows_kernel",
     ["float", 32, 2, 1, "true"]),
    ("void fsce::cuda::(anonymous namespace)::split_grad_kernel<double, 2>(fsce::CEParams, int, long)",
     "split_grad_kernel", ["double", 2]),
])
def test_kernel_identity(demangled, name, args):
    assert sr.kernel_identity(demangled) == (name, args)


def test_describe_uses_the_launch_table_and_fails_on_unknown_kernels():
    k = sr.describe("void ns::rows_kernel<__half, 32, 1, 0, false>(fsce::CEParams)")
    assert (k.name, k.dtype, k.params, k.threads, k.phase, k.plain) == (
        "rows_kernel", "fp16", "32, 1, 0, false", 256, "forward_inplace", True)
    # the in-place 256-thread rows keep a row in dynamic shared memory
    assert k.dynamic_smem == 0
    assert sr.describe("void ns::rows_kernel<__half, 256, 1, 0, false>(fsce::CEParams, bool)").dynamic_smem == (
        sr.ROW_CACHE_BYTES)
    # the logit transform or the statistics make a variant that is reported, not budgeted
    assert not sr.describe("void ns::rows_kernel<float, 256, 2, 2, false>(fsce::CEParams)").plain
    assert not sr.describe("void ns::spatial_kernel<float, 0, 0, true>(fsce::CEParams)").plain
    assert not sr.describe("void ns::split_grad_kernel<float, 1>(fsce::CEParams, int, long)").plain
    assert sr.describe("void ns::split_stats_kernel<float, 0, false>(fsce::CEParams, int, long)").plain
    with pytest.raises(SystemExit, match="unknown kernel new_kernel"):
        sr.describe("void ns::new_kernel<float>(fsce::CEParams)")
    with pytest.raises(SystemExit, match="no longer match"):
        sr.describe("void ns::rows_kernel<float, 32, 0>(fsce::CEParams)")  # a changed template


def test_launch_bounds():
    assert sr.launch_bounds(elf({FWD: 256, BWD: 1024})) == {FWD: 256, BWD: 1024}


needs_cxxfilt = pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) is not installed")


@needs_cxxfilt
def test_analyse_and_budgets():
    kernels = sr.analyse(PTXAS, SASS, elf({FWD: 256, BWD: 256}))
    by_phase = {r["kernel"].phase: r for r in kernels}
    fwd, bwd = by_phase["forward"], by_phase["backward"]
    assert (fwd["blocks"], fwd["warps"], bwd["blocks"], bwd["warps"]) == (5, 40, 1, 8)
    assert fwd["passes"]["read"].elements == 16 and fwd["passes"]["write"] is None
    value, limit, fails = sr.budget(fwd)
    assert (value, limit, fails) == (pytest.approx(11 / 16), 16, [])
    value, limit, fails = sr.budget(bwd)
    assert (value, limit) == (pytest.approx(5 / 8), 12)
    assert fails == ["spill in loop", "1 block/SM"]  # the LDL in the write loop; 160 registers: 8 warps
    table = sr.table(kernels)
    assert "MISS: spill in loop" in table and "| rows_kernel | bf16 | 256, 0, 0, false | forward | 256 | 48 |" in table


@needs_cxxfilt
def test_budgets_apply_to_plain_variants_only():
    # the same code as a softcap variant (TR = 2): reported, not held to the budget
    softcap = FWD.replace("Li0ELi0ELb0E", "Li0ELi2ELb0E")
    kernels = sr.analyse(PTXAS.replace(FWD, softcap), SASS.replace(FWD, softcap), elf({softcap: 256, BWD: 256}))
    (fwd,) = [r for r in kernels if r["kernel"].phase == "forward"]
    assert not fwd["kernel"].plain
    fwd["passes"]["read"].path = 16 * 20  # 20 per element, over the plain budget of 16
    value, limit, fails = sr.budget(fwd)
    assert (value, limit, fails) == (pytest.approx(20), None, [])


@needs_cxxfilt
def test_analyse_fails_when_the_table_disagrees_with_launch_bounds():
    with pytest.raises(SystemExit, match="__launch_bounds__"):
        sr.analyse(PTXAS, SASS, elf({FWD: 512, BWD: 256}))


@needs_cxxfilt
def test_analyse_fails_when_it_finds_no_loop():
    # a changed disassembly format must not pass the spill gate silently
    no_loops = "\n".join(line for line in SASS.splitlines() if " BRA " not in line)
    with pytest.raises(SystemExit, match="no element loop"):
        sr.analyse(PTXAS, no_loops, elf({FWD: 256, BWD: 256}))
    with pytest.raises(SystemExit, match="format changed"):
        sr.analyse(PTXAS, "", "")
