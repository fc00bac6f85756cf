"""Static report on the compiled CUDA kernels for sm_90 (no GPU needed).

Compiles csrc/cuda/kernels.cu and csrc/cuda/jsd.cu (SOURCES) for sm_90 with the flags setup.py's
CUDAExtension uses, plus `-Xptxas -v -cubin`, and reports per kernel:

- registers, spill stores/loads (bytes) and static shared memory, from the
  `-Xptxas -v` output;
- resident blocks (and warps) per SM on Hopper, from registers, shared memory
  (static, plus the most dynamic shared memory it is launched with:
  DYNAMIC_SMEM) and the kernel's threads per block (KERNELS below, read from kernels.cu's
  launch code and checked against the cubin's __launch_bounds__);
- SASS instructions per element in the hot loops, from `cuobjdump -sass`.

Every figure is static, read from the compiled code; nothing runs on a GPU.

Hot loops, and the per-element heuristic:

- A loop is a backward branch (`BRA` to an address at or before itself);
  its body is the address range [target, branch]. Back edges to one target
  are one loop. The innermost loops (containing no other loop) are kept.
- An instruction of the body is conditional when it is predicated (`@P`) or
  lies between a forward branch of the body and that branch's target inside
  the body (an if/else within the iteration).
- Elements per iteration: a loop that stores to global memory is a write
  loop, and its elements are the bytes of its unconditional global stores
  divided by the element size (each element is written once; weights and
  targets are never written). Otherwise it is a read loop, and its elements
  are the bytes of its unconditional global loads of the widest width
  present, divided by the element size (the logits come in 16-byte vectors;
  per-class weights and probability targets are narrower or conditional). A
  loop that stores without loading (from global or shared memory) fills
  ignored rows (`fill`: no steady state). A loop with neither is no element loop (a merge of partials). In
  a scalar read loop (widest load = one element) an unconditional load of a
  weight or target would also count as an element: such loops are marked
  `scalar` and their figure is then a lower bound.
- Instructions per iteration: those on the plain path through one
  iteration (a row with class-index targets and no weights): from the loop
  header to its back edge, following unconditional branches, taking a
  predicated forward branch only when the code it skips reads global memory
  (weights, probability targets), running everything else, predicated
  instructions included. NOPs do not count, nor do out-of-line blocks or
  subroutines (CALL) the body jumps to. The CSV also has the whole body's
  count (`loop_instructions`), an upper bound.
- Per kernel, the steady state of a pass is its loop with the most elements
  per iteration (the unrolled body, not the remainder or scalar head and
  tail loops): `read` for the read pass, `write` for the write pass.

Budgets (issue 11), per element in the steady-state loop, for bf16/fp16 and
the plain variants (identity logit transform, no argmax statistics; the
others are reported): forward (the read pass) <= 16, backward (the write
pass) <= 12, in-place forward (read + write) <= 24. For every kernel and dtype: no local-memory
access (LDL/STL: spills) inside an element loop, and at least 2 blocks or 32
warps resident per SM. `--check` exits 1 on a spill in an element loop (the
CI gate); the other budgets are reported, not gated.

    python tools/sass_report.py            # compile (cached in build/sass/), print, write CSV
    python tools/sass_report.py --check    # ... and exit 1 on a spill in a hot loop
    python tools/sass_report.py --plain    # ... printing only the plain variants (README)
"""
import argparse
import csv
import dataclasses
import datetime
import glob
import hashlib
import importlib.util
import math
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "build" / "sass"
SOURCE = "csrc/cuda/kernels.cu"  # the cross-entropy's translation unit; its layers are headers beside it
# Every translation unit reported: the cross-entropy's and the generalized JSD's.
SOURCES = (SOURCE, "csrc/cuda/jsd.cu")
KERNEL_HEADER = "csrc/cuda/row_kernels.cuh"  # the kernel families and their constants
ARCH = "90"

# Hopper (sm_90) limits per SM.
REGS_PER_SM = 65536
REG_ALLOC_PER_WARP = 256  # registers are granted to a warp in units of 256
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024  # the runtime's share of each block (sm_80 and later)
SMEM_ALLOC = 128

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
CXX_TYPES = {"float": "fp32", "double": "fp64", "__half": "fp16", "__nv_bfloat16": "bf16"}

# kernels.cu's enum Phase.
PHASES = {0: "forward", 1: "forward_inplace", 2: "backward"}

# kernels.cu's logit transform (TR: 0 identity, 1 scale, 2 softcap) and
# statistics flag (STATS), as they appear in demangled template arguments.
IDENTITY, NO_STATS = 0, "false"

# Per kernel (its template arguments a, T first, ints as ints, bools as
# "true"/"false"): threads per block, phase, and whether it is the plain
# variant (identity transform, no statistics), as kernels.cu launches it.
# Phase None: no element loop. The instruction budgets apply to plain variants.
KERNELS = {
    # rows_kernel<T, G, PHASE, TR, STATS>: kRowThreads for every G
    "rows_kernel": (lambda a: 256, lambda a: PHASES[a[2]], lambda a: a[3] == IDENTITY and a[4] == NO_STATS),
    # spatial_kernel<T, PHASE, TR, STATS>
    "spatial_kernel": (lambda a: 256, lambda a: PHASES[a[1]], lambda a: a[2] == IDENTITY and a[3] == NO_STATS),
    # spatial_rows_kernel<T, PHASE, TR>: plain rows only, V adjacent per thread
    "spatial_rows_kernel": (lambda a: 256, lambda a: PHASES[a[1]], lambda a: a[2] == IDENTITY),
    # split_stats_kernel<T, TR, STATS>: kSplitThreads
    "split_stats_kernel": (lambda a: 256, lambda a: "forward", lambda a: a[1] == IDENTITY and a[2] == NO_STATS),
    # split_grad_kernel<T, TR>: also the in-place split path
    "split_grad_kernel": (lambda a: 256, lambda a: "backward", lambda a: a[1] == IDENTITY),
    # split_finish_kernel<T, TR, STATS>: merges per-split states
    "split_finish_kernel": (lambda a: 256, lambda a: None, lambda a: a[1] == IDENTITY and a[2] == NO_STATS),
    # scale_kernel<T>: scale_grad_ of the in-place mode
    "scale_kernel": (lambda a: 256, lambda a: "backward", lambda a: True),
    # jsd.cu's jsd_forward_kernel<T, FORM> and jsd_backward_kernel<T, FORM>:
    # kJsdThreads; outside the cross-entropy's budgets (not "plain").
    "jsd_forward_kernel": (lambda a: 256, lambda a: "forward", lambda a: False),
    "jsd_backward_kernel": (lambda a: 256, lambda a: "backward", lambda a: False),
}

# The most dynamic shared memory a kernel is launched with (its arguments a
# as in KERNELS), counted in its resident blocks: the in-place 256-thread
# rows keep a row of up to kRowCacheBytes (read from KERNEL_HEADER) there between
# their two passes.
ROW_CACHE_BYTES = math.prod(int(f) for f in re.search(
    r"kRowCacheBytes = ([\d\s*]+);", (ROOT / KERNEL_HEADER).read_text()).group(1).split("*"))
DYNAMIC_SMEM = {
    "rows_kernel": lambda a: ROW_CACHE_BYTES if a[1] == 256 and PHASES[a[2]] == "forward_inplace" else 0}

# Budgets in SASS instructions per element (bf16/fp16) and the passes summed.
BUDGETS = {"forward": (16, ("read",)), "backward": (12, ("write",)), "forward_inplace": (24, ("read", "write"))}
BUDGET_DTYPES = ("bf16", "fp16")
MIN_BLOCKS, MIN_WARPS = 2, 32


# --- SASS parsing -------------------------------------------------------------

@dataclasses.dataclass
class Instr:
    addr: int
    pred: str  # "" or e.g. "@!P0"
    op: str  # e.g. "LDG.E.128"
    args: str

    @property
    def base(self):
        return self.op.split(".")[0]


_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text):
    """cuobjdump -sass output -> {mangled function name: [Instr]}."""
    funcs, current = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            current.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return funcs


def branch_target(ins):
    """The target address of a BRA, else None."""
    if ins.base != "BRA":
        return None
    hexes = re.findall(r"0x([0-9a-fA-F]+)", ins.args)
    return int(hexes[-1], 16) if hexes else None


@dataclasses.dataclass(order=True)
class Loop:
    start: int  # the header: the back edge's target
    end: int  # the address of the last back edge

    def contains(self, other):
        return self != other and self.start <= other.start and other.end <= self.end


def find_loops(instrs):
    """Loops from back edges; back edges to one header make one loop."""
    ends = {}
    for ins in instrs:
        t = branch_target(ins)
        if t is not None and t < ins.addr:  # t == addr is the trap after EXIT
            ends[t] = max(ends.get(t, t), ins.addr)
    return sorted(Loop(s, e) for s, e in ends.items())


def innermost(loops):
    return [lp for lp in loops if not any(lp.contains(o) for o in loops)]


def access_bytes(op):
    """Bytes moved by a load/store opcode such as LDG.E.128, STG.E.U16 or LDG.E (4)."""
    parts = set(op.split(".")[1:])
    for suffix, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if suffix in parts:
            return size
    return 4


GLOBAL_LOADS, GLOBAL_STORES, LOCAL = {"LDG", "LD"}, {"STG", "ST"}, {"LDL", "STL"}
SHARED_LOADS = {"LDS", "LDSM"}


@dataclasses.dataclass
class LoopStats:
    start: int
    end: int
    instructions: int  # the whole body
    path: int  # one iteration's plain path (plain_path), or the whole body
    kind: str  # "read", "write", "fill" (stores only) or "" (no element loop)
    elements: int
    scalar: bool
    local_accesses: int  # LDL/STL in the body
    calls: int

    @property
    def per_element(self):
        return self.path / self.elements if self.elements else None


def plain_path(body, loop):
    """Instructions (NOPs aside) on one iteration's path for a plain row.

    From the header to the back edge: unconditional branches are followed, a
    predicated forward branch inside the body is taken only when the code it
    skips reads global memory (per-class weights or probability targets, which
    a row with class-index targets and no weights does not read); all other
    code runs, predicated instructions included (they issue either way). None
    when an unconditional branch leaves the loop's address range.
    """
    index = {ins.addr: n for n, ins in enumerate(body)}
    n, count = 0, 0
    while n < len(body):
        ins = body[n]
        count += ins.base != "NOP"
        t = branch_target(ins)
        if t == loop.start:
            return count
        if t is not None and t > ins.addr and ins.op != "BRA.DIV":  # BRA.DIV: the warp is converged
            if t not in index and not ins.pred:
                return None
            skipped = body[n + 1:index[t]] if t in index else []
            if not ins.pred or any(i.base in GLOBAL_LOADS for i in skipped):
                n = index[t]
                continue
        n += 1
    return None


def loop_stats(instrs, loop, element_bytes):
    body = [i for i in instrs if loop.start <= i.addr <= loop.end]
    conditional = set()
    for ins in body:
        t = branch_target(ins)
        if t is not None and ins.addr < t <= loop.end:  # an if/else inside the iteration
            conditional.update(i.addr for i in body if ins.addr < i.addr < t)
    sure = [i for i in body if not i.pred and i.addr not in conditional]
    stores = [access_bytes(i.op) for i in sure if i.base in GLOBAL_STORES]
    loads = [access_bytes(i.op) for i in sure if i.base in GLOBAL_LOADS]
    if stores:  # a loop that stores without reading (global or shared memory) fills ignored rows
        reads = loads or any(i.base in SHARED_LOADS for i in sure)
        kind, elements, scalar = "write" if reads else "fill", sum(stores) // element_bytes, False
    elif loads:
        widest = max(loads)
        kind, elements = "read", sum(b for b in loads if b == widest) // element_bytes
        scalar = widest <= element_bytes
    else:
        kind, elements, scalar = "", 0, False
    return LoopStats(
        loop.start, loop.end,
        instructions=sum(1 for i in body if i.base != "NOP"),
        path=plain_path(body, loop) or sum(1 for i in body if i.base != "NOP"),
        kind=kind, elements=elements, scalar=scalar,
        local_accesses=sum(1 for i in body if i.base in LOCAL),
        calls=sum(1 for i in body if i.base == "CALL"),
    )


def steady_state(stats, kind):
    """The loop of one pass with the most elements per iteration (the costlier on a tie), or None."""
    candidates = [s for s in stats if s.kind == kind and s.elements]
    return max(candidates, key=lambda s: (s.elements, s.path)) if candidates else None


# --- ptxas -v and occupancy ---------------------------------------------------

@dataclasses.dataclass
class Resources:
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0


def parse_ptxas(log):
    """`-Xptxas -v` output -> {mangled name: Resources}."""
    out, current = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            current = out.setdefault(m.group(1), Resources())
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    return out


def resident_blocks(registers, smem, threads):
    """Blocks per SM on sm_90 and the limit that sets it."""
    if threads > 1024 or smem > SMEM_PER_BLOCK:
        raise ValueError(f"a block of {threads} threads and {smem} bytes of shared memory cannot launch on sm_90")
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_PER_WARP) * REG_ALLOC_PER_WARP
    smem_per_block = math.ceil((smem + SMEM_RESERVED_PER_BLOCK) / SMEM_ALLOC) * SMEM_ALLOC
    limits = {
        "registers": REGS_PER_SM // (regs_per_warp * warps),
        "threads": THREADS_PER_SM // (warps * 32),
        "blocks": BLOCKS_PER_SM,
        "smem": SMEM_PER_SM // smem_per_block,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


# --- kernel names -------------------------------------------------------------

def split_template_args(text):
    args, depth, cur = [], 0, ""
    for ch in text:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return args + [cur.strip()] if cur.strip() else args


def kernel_identity(demangled):
    """'void ns::rows_kernel<__nv_bfloat16, 32, 0>(fsce::CEParams)' -> ('rows_kernel', ['__nv_bfloat16', 32, 0])."""
    m = re.search(r"(\w+)<(.*)>\s*\(", demangled)
    if not m:
        raise ValueError(f"kernel {demangled!r} has no template arguments; expected the dtype as the first")
    args = []
    for a in split_template_args(m.group(2)):
        n = re.fullmatch(r"(?:\([^()]*(?:\([^()]*\)[^()]*)*\))?\s*(-?\d+)[uUlL]*", a)  # "(ns::Phase)1" or "32"
        args.append(int(n.group(1)) if n else a)
    return m.group(1), args


@dataclasses.dataclass
class Kernel:
    name: str
    dtype: str
    args: list  # the template arguments after T
    threads: int
    phase: str  # a PHASES value, or None
    plain: bool = True  # identity transform, no statistics: the budgeted variant
    dynamic_smem: int = 0  # bytes, at most (DYNAMIC_SMEM)

    @property
    def params(self):
        return ", ".join(str(a) for a in self.args)


def describe(demangled):
    try:
        name, args = kernel_identity(demangled)
    except ValueError as e:
        raise SystemExit(f"sass_report: {e}") from None
    if name not in KERNELS:
        raise SystemExit(f"sass_report: unknown kernel {name} ({demangled}): add its threads per block "
                         f"and phase to KERNELS in {__file__}, as kernels.cu launches it")
    if args[0] not in CXX_TYPES:
        raise SystemExit(f"sass_report: {demangled}: the first template argument {args[0]!r} is not a dtype")
    threads_of, phase_of, plain_of = KERNELS[name]
    try:
        threads, phase, plain = threads_of(args), phase_of(args), plain_of(args)
    except (IndexError, KeyError, TypeError) as e:
        raise SystemExit(f"sass_report: {demangled}: its template arguments no longer match KERNELS in "
                         f"{__file__} ({e!r}); update the table from kernels.cu's launch code") from None
    dynamic = DYNAMIC_SMEM.get(name, lambda a: 0)(args)
    return Kernel(name, CXX_TYPES[args[0]], args[1:], threads, phase, plain, dynamic)


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def launch_bounds(elf_text):
    """cuobjdump -elf output -> {mangled name: max threads per block from __launch_bounds__}."""
    bounds = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", elf_text):
        head = re.match(r"\.nv\.info\.(\S+)", section)
        m = re.search(r"EIATTR_MAX_THREADS\s*\n\s*Format:.*\n\s*Value:\s*"
                      r"0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)", section)
        if head and m:
            bounds[head.group(1)] = math.prod(int(v, 16) for v in m.groups())
    return bounds


# --- compiling ----------------------------------------------------------------

def find_tool(name):
    """cuobjdump: the toolkit's, on PATH, triton's (installed with torch) or nvidia-cuda-cuobjdump's."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [os.path.join(cuda_home, "bin", name), shutil.which(name)]
    triton = importlib.util.find_spec("triton")
    if triton and triton.origin:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", name))
    candidates += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "**", "bin", name),
                                   recursive=True))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit(f"sass_report: no {name} found (looked in $CUDA_HOME/bin, PATH, triton's "
                     f"backends/nvidia/bin, and the nvidia-cuda-cuobjdump package); "
                     f"`pip install nvidia-cuda-cuobjdump` provides one")


def nvcc_command(cubin, source=SOURCE):
    """The nvcc line of setup.py's CUDAExtension for `source`, for sm_90 only, to a cubin."""
    os.environ.update(FSCE_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0")
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    import setuptools
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, _get_cuda_arch_flags, _join_cuda_home

    captured = {}
    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        runpy.run_path(str(ROOT / "setup.py"))
    finally:
        setuptools.setup = real_setup
        os.chdir(cwd)
    (ext,) = captured["ext_modules"]
    nvcc_flags = ext.extra_compile_args["nvcc"]
    # What BuildExtension adds to every extension, as in a real build.
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={ext.name.split('.')[-1]}"]
    return ([_join_cuda_home("bin", "nvcc"), str(ROOT / source), "-cubin", "-o", str(cubin)]
            + [f"-I{p}" for p in ext.include_dirs]
            + [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in ext.define_macros]
            + COMMON_NVCC_FLAGS + nvcc_flags + defines + _get_cuda_arch_flags(nvcc_flags)
            + ["-Xptxas", "-v"] + ([] if "-lineinfo" in nvcc_flags else ["-lineinfo"]))


def toolkit_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def compile_cached(force=False):
    """Compiles each of SOURCES unless its sources and command are unchanged;
    -> (the ptxas logs, the cubin paths, the first command)."""
    logs, cubins, cmds = [], [], []
    for source in SOURCES:
        log, cubin, cmd = _compile_one(source, force)
        logs.append(log)
        cubins.append(cubin)
        cmds.append(cmd)
    return "\n".join(logs), cubins, cmds[0]


def _compile_one(source, force):
    CACHE.mkdir(parents=True, exist_ok=True)
    stem = pathlib.Path(source).stem
    cubin = CACHE / f"{stem}.sm_{ARCH}.cubin"
    cmd = nvcc_command(cubin, source)
    digest = hashlib.sha256(" ".join(cmd).encode())
    for path in sorted(glob.glob(str(ROOT / "csrc" / "**" / "*"), recursive=True)):
        if path.endswith((".cu", ".cuh", ".h")):
            digest.update(path.encode() + pathlib.Path(path).read_bytes())
    log, stamp = CACHE / f"{stem}.ptxas.log", CACHE / f"{stem}.inputs.sha256"
    if not force and cubin.exists() and log.exists() and stamp.exists() and stamp.read_text() == digest.hexdigest():
        return log.read_text(), cubin, cmd
    print(f"sass_report: compiling {source} for sm_{ARCH} (minutes on 2 cores)...", file=sys.stderr, flush=True)
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.stderr.write(run.stdout + run.stderr)
        raise SystemExit(f"sass_report: nvcc failed ({run.returncode})")
    log.write_text(run.stdout + run.stderr)
    stamp.write_text(digest.hexdigest())
    return log.read_text(), cubin, cmd


# --- the report ---------------------------------------------------------------

COLUMNS = ["toolkit", "arch", "date", "kernel", "dtype", "params", "phase", "plain_variant", "threads", "registers",
           "spill_stores_bytes", "spill_loads_bytes", "stack_bytes", "static_smem_bytes", "dynamic_smem_bytes",
           "blocks_per_sm",
           "warps_per_sm", "occupancy_limiter", "loop", "loop_kind", "loop_instructions", "path_instructions",
           "loop_elements", "instr_per_element", "scalar_loop", "local_mem_in_loop", "calls_in_loop", "steady_state",
           "heuristic"]
HEURISTIC = ("non-NOP SASS instructions on the innermost loop's plain path (predicated branches taken only "
             "over code that reads global memory) / elements per iteration (write loop: bytes of unconditional "
             "global stores / element size; read loop: bytes of unconditional global loads of the widest width "
             "/ element size)")


def analyse(ptxas_log, sass_text, elf_text):
    """One dict per kernel: resources, occupancy, loops and budgets."""
    resources, funcs, bounds = parse_ptxas(ptxas_log), parse_sass(sass_text), launch_bounds(elf_text)
    if not funcs or not all(funcs.values()):
        raise SystemExit("sass_report: no kernels, or a kernel without instructions, in the cuobjdump -sass "
                         "output: has its format changed?")
    names = demangle(sorted(funcs))
    kernels = []
    for mangled, instrs in funcs.items():
        k = describe(names[mangled])
        if mangled in bounds and bounds[mangled] != k.threads:
            raise SystemExit(f"sass_report: {names[mangled]} has __launch_bounds__({bounds[mangled]}) but KERNELS "
                             f"says {k.threads} threads; update the table from kernels.cu's launch code")
        res = resources.get(mangled)
        if res is None:
            raise SystemExit(f"sass_report: no ptxas -v line for {names[mangled]}")
        blocks, limiter = resident_blocks(res.registers, res.smem + k.dynamic_smem, k.threads)
        stats = [loop_stats(instrs, lp, ELEMENT_BYTES[k.dtype]) for lp in innermost(find_loops(instrs))]
        if not k.phase:  # no element loop by construction (e.g. a merge over splits)
            for s in stats:
                s.kind, s.elements = "", 0
        passes = {kind: steady_state(stats, kind) for kind in ("read", "write")}
        kernels.append(dict(kernel=k, res=res, blocks=blocks, warps=blocks * math.ceil(k.threads / 32),
                            limiter=limiter, loops=stats, passes=passes))
    # Without this the spill gate would pass on a parser that sees no loops.
    if not any(s.kind for r in kernels for s in r["loops"]):
        raise SystemExit("sass_report: no element loop in any kernel: has the cuobjdump -sass format changed?")
    order, dtypes = {n: i for i, n in enumerate(KERNELS)}, list(ELEMENT_BYTES)
    kernels.sort(key=lambda r: (order[r["kernel"].name], [(0, a, "") if isinstance(a, int) else (1, 0, a)
                                                           for a in r["kernel"].args],
                                dtypes.index(r["kernel"].dtype)))
    return kernels


def budget(row):
    """(instructions per element of the budgeted passes, budget or None, [failures])."""
    k, passes = row["kernel"], row["passes"]
    fails = []
    if any(s.local_accesses and s.kind for s in row["loops"]):
        fails.append("spill in loop")
    if row["blocks"] < MIN_BLOCKS and row["warps"] < MIN_WARPS:
        fails.append(f"{row['blocks']} block/SM")
    if k.phase is None:
        return None, None, fails
    limit, kinds = BUDGETS[k.phase]
    if any(passes[kind] is None for kind in kinds):
        fails.append("no " + "+".join(kinds) + " loop found")
        return None, None, fails
    value = sum(passes[kind].per_element for kind in kinds)
    budgeted = k.dtype in BUDGET_DTYPES and k.plain
    if budgeted and value > limit:
        fails.append(f"{value:.1f} > {limit}/elem")
    return value, (limit if budgeted else None), fails


def csv_rows(kernels, toolkit, date):
    rows = []
    for r in kernels:
        k, res = r["kernel"], r["res"]
        base = dict(toolkit=toolkit, arch=f"sm_{ARCH}", date=date, kernel=k.name, dtype=k.dtype, params=k.params,
                    phase=k.phase or "", plain_variant=int(k.plain), threads=k.threads, registers=res.registers,
                    spill_stores_bytes=res.spill_stores, spill_loads_bytes=res.spill_loads, stack_bytes=res.stack,
                    static_smem_bytes=res.smem, dynamic_smem_bytes=k.dynamic_smem,
                    blocks_per_sm=r["blocks"], warps_per_sm=r["warps"],
                    occupancy_limiter=r["limiter"], heuristic=HEURISTIC)
        steady = {id(s) for s in r["passes"].values() if s}
        for s in r["loops"] or [None]:
            row = dict(base)
            if s is not None:
                row.update(loop=f"{s.start:#06x}-{s.end:#06x}", loop_kind=s.kind, loop_instructions=s.instructions,
                           path_instructions=s.path, loop_elements=s.elements,
                           instr_per_element=f"{s.per_element:.2f}" if s.per_element else "",
                           scalar_loop=int(s.scalar), local_mem_in_loop=s.local_accesses, calls_in_loop=s.calls,
                           steady_state=int(id(s) in steady))
            rows.append(row)
    return rows


def fmt(s):
    return f"{s.per_element:.1f}" + ("*" if s.scalar else "") if s else "–"


def table(kernels):
    head = ["kernel", "dtype", "template args", "phase", "threads", "regs", "spill st/ld B", "smem B",
            "blocks (warps)/SM", "read/elem", "write/elem", "budget", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in kernels:
        k, res = r["kernel"], r["res"]
        value, limit, fails = budget(r)
        if limit is not None:
            target = f"≤ {limit}"
        elif k.phase:
            target = "spills, occupancy"
        else:
            target = "occupancy"
        lines.append("| " + " | ".join([
            k.name, k.dtype, k.params, k.phase or "–", str(k.threads), str(res.registers),
            f"{res.spill_stores}/{res.spill_loads}", str(res.smem) + (f"+{k.dynamic_smem}" if k.dynamic_smem else ""),
            f"{r['blocks']} ({r['warps']})",
            fmt(r["passes"]["read"]), fmt(r["passes"]["write"]), target,
            "ok" if not fails else "MISS: " + ", ".join(fails)]) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill (LDL/STL) inside an element loop")
    parser.add_argument("--force", action="store_true", help="recompile even when the sources are unchanged")
    parser.add_argument("--plain", action="store_true",
                        help="print only the plain variants (the README's table); the CSV has every kernel")
    parser.add_argument("--out", default=None,
                        help="CSV path (default: bench/results/sass-sm_90-cuda<version>-<date>.csv)")
    args = parser.parse_args()

    ptxas_log, cubins, cmd = compile_cached(args.force)
    cuobjdump = find_tool("cuobjdump")

    def dump(flag):
        return "\n".join(subprocess.run([cuobjdump, flag, str(c)], capture_output=True, text=True, check=True).stdout
                         for c in cubins)

    sass, elf = dump("-sass"), dump("-elf")
    kernels = analyse(ptxas_log, sass, elf)

    toolkit, date = toolkit_version(cmd[0]), datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = pathlib.Path(args.out) if args.out else RESULTS / f"sass-sm_{ARCH}-cuda{toolkit}-{date}.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(kernels, toolkit, date))

    print(f"Static SASS report: sm_{ARCH}, CUDA {toolkit}, {date} (compiled code, not measured on a GPU). "
          "Per element in the steady-state loop; * = scalar loop (a lower bound).\n")
    print(table([r for r in kernels if r["kernel"].plain] if args.plain else kernels))
    print(f"\nCSV: {out}")
    spills = [(r["kernel"], s) for r in kernels for s in r["loops"] if s.local_accesses and s.kind]
    for k, s in spills:
        print(f"spill: {k.name}<{k.dtype}, {k.params}> ({k.phase}): {s.local_accesses} LDL/STL in its "
              f"{s.kind} loop {s.start:#06x}-{s.end:#06x}", file=sys.stderr)
    if spills and args.check:
        sys.exit(1)


if __name__ == "__main__":
    main()
