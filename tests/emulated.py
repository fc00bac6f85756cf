"""The CUDA kernels on the CPU: builds tools/cuda_emu's driver (plain, ASan+UBSan,
TSan; `make emu`), writes cases whose CEParams are filled as csrc/binding.cpp
fills them, runs them through the real launchers and reads every buffer back.

A case is built from CPU tensors: each tensor travels as the span of its
storage up to its last element (so that ASan sees a read past it), with its
storage offset as a byte offset; outputs start poisoned with nan bytes.
"""
import concurrent.futures
import dataclasses
import os
import pathlib
import struct
import subprocess
import tempfile

import torch

from fused_softmax_ce._derivatives import acc_dtype  # the kernels' accumulation dtype

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The mutation check narrows this with FSCE_EMU_VARIANTS; `make test` runs all three.
VARIANTS = tuple(os.environ.get("FSCE_EMU_VARIANTS", "plain asan tsan").split())
EMU_OUT = pathlib.Path(os.environ.get("FSCE_EMU_OUT", ROOT / "build" / "emu"))

# csrc/params.h's DType.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
POINTERS = ("logits", "target_index", "target_prob", "weight", "weight_sum", "loss", "lse", "pred",
            "target_pred", "grad", "grad_output", "grad_lse", "grad_scale", "lse_grad_scale", "entropy",
            "grad_entropy", "row_weight")
INTS = ("outer", "classes", "inner", "rows", "logits_outer_stride", "target_outer_stride", "ignore_index",
        "class_offset", "total_classes", "grad_outer_stride", "grad_output_stride")
FLOATS = ("label_smoothing", "logit_scale", "softcap")
OPS = {"forward": 0, "forward_inplace": 1, "backward": 2, "scale_rows": 3}

# Emulated devices (SMs, shared memory per SM, per-block opt-in): H100; small
# SM counts with H100's or A100's shared memory, so that few rows fill them
# (split rows at a few rows, row kernels from 2 rows).
H100, SMALL, TINY, A100_SMEM = 0, 1, 2, 3
DEVICES = ((132, 228 * 1024, 227 * 1024), (4, 228 * 1024, 227 * 1024), (1, 228 * 1024, 227 * 1024),
           (1, 164 * 1024, 163 * 1024))


def build(csrc=None, out=None, variants=VARIANTS, driver=None):
    """Builds the drivers with make (a no-op when they are up to date): all
    of them, or that one (e.g. jsd_driver) in each variant."""
    out = out or EMU_OUT
    targets = ["emu"] if driver is None else [f"{out}/{v}/{driver}" for v in variants]
    args = ["make", "-s", "-C", str(ROOT), *targets, "EMU_VARIANTS=" + " ".join(variants)]
    if csrc:
        args.append(f"EMU_CSRC={csrc}")
    args.append(f"EMU_OUT={out}")
    subprocess.run(args, check=True)


def storage_span(t):
    """t's storage from its start to t's last element, as bytes, and t's byte offset."""
    size = t.element_size()
    end = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes(),))
    return raw[: end * size].numpy().tobytes(), t.storage_offset() * size


@dataclasses.dataclass
class View:
    buffer: int
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int  # elements


class Case:
    """One launch: CEParams' fields, its buffers and pointers."""

    def __init__(self, op, name, device=H100):
        self.op, self.name, self.device = op, name, device
        self.ints = dict.fromkeys(INTS, 0)
        self.floats = {"label_smoothing": 0.0, "logit_scale": 1.0, "softcap": 0.0}
        self.dtype, self.target_prob_acc = torch.float32, False
        self.buffers, self.pointers, self.views = [], {}, {}

    def put(self, field, t):
        """Points `field` at tensor t (its values travel)."""
        data, offset = storage_span(t)
        self.buffers.append(data)
        self.pointers[field] = (len(self.buffers) - 1, offset)
        self.views[field] = View(len(self.buffers) - 1, t.dtype, tuple(t.shape), t.stride(), t.storage_offset())

    def alias(self, field, other):
        self.pointers[field] = self.pointers[other]
        self.views[field] = self.views[other]

    def output(self, field, shape, dtype, stride=None, offset=0):
        """A poisoned output (nan bytes) of that layout."""
        stride = stride or torch.empty(shape).stride()
        span = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1 if all(shape) else offset
        poison = -(2**62) if dtype == torch.long else float("nan")
        t = torch.full((max(span, 1),), poison, dtype=dtype)
        self.put(field, t.as_strided(shape, stride, offset))

    def encode(self):
        out = [struct.pack("<iiii", OPS[self.op], self.device, DTYPE_CODES[self.dtype], int(self.target_prob_acc))]
        out.append(struct.pack("<" + "q" * len(INTS), *(self.ints[k] for k in INTS)))
        out.append(struct.pack("<" + "d" * len(FLOATS), *(self.floats[k] for k in FLOATS)))
        for field in POINTERS:
            out.append(struct.pack("<iq", *self.pointers.get(field, (-1, 0))))
        out.append(struct.pack("<I", len(self.buffers)))
        for data in self.buffers:
            out.append(struct.pack("<Q", len(data)) + data)
        return b"".join(out)


@dataclasses.dataclass
class Result:
    error: str
    buffers: list
    views: dict

    def __getitem__(self, field):
        v = self.views[field]
        data = self.buffers[v.buffer]
        size = torch.empty(0, dtype=v.dtype).element_size()
        flat = torch.empty(0, dtype=v.dtype)
        if len(data) >= size:
            flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)[: len(data) // size * size].view(v.dtype)
        return flat.as_strided(v.shape, v.stride, v.offset)


@dataclasses.dataclass
class Batch:
    results: list
    launches: dict  # kernel family -> launches
    queries: dict  # "device" / "function" -> attribute queries
    returncode: int
    log: str


def run(cases, variant, out=None, timeout=900, driver="driver"):
    """Runs the cases in one process of that build's `driver` (jsd_driver:
    the generalized JSD's); a driver that outlives `timeout` seconds (a hang)
    is killed and reported."""
    driver = pathlib.Path(out or EMU_OUT) / variant / driver
    with tempfile.TemporaryDirectory() as tmp:
        cases_path, out_path = pathlib.Path(tmp, "cases"), pathlib.Path(tmp, "out")
        header = b"FSCEEMU1" + struct.pack("<I", len(DEVICES))
        header += b"".join(struct.pack("<iii", *d) for d in DEVICES)
        cases_path.write_bytes(header + struct.pack("<I", len(cases)) + b"".join(c.encode() for c in cases))
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
                   TSAN_OPTIONS="halt_on_error=1:exitcode=66", UBSAN_OPTIONS="print_stacktrace=1")
        try:
            proc = subprocess.run([str(driver), str(cases_path), str(out_path)], capture_output=True, text=True,
                                  env=env, timeout=timeout)
            returncode, stdout, log = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            returncode, stdout = -9, ""
            log = (e.stderr or b"").decode(errors="replace") + f"\nthe driver hung: killed after {timeout} s"
        data = out_path.read_bytes() if out_path.exists() else b""
    results = _decode(data, cases)
    launches, queries = {}, {}
    for line in stdout.splitlines():
        words = line.split()
        if words[:1] == ["launch"]:
            launches[words[1]] = int(words[2])
        elif words[:1] == ["queries"]:
            queries = {words[1]: int(words[2]), words[3]: int(words[4])}
    return Batch(results, launches, queries, returncode, log)


def run_variants(cases, driver="driver"):
    """The cases through every build (VARIANTS), the drivers side by side: {variant: Batch}."""
    with concurrent.futures.ThreadPoolExecutor(len(VARIANTS)) as pool:
        return dict(zip(VARIANTS, pool.map(lambda v: run(cases, v, driver=driver), VARIANTS)))


def _decode(data, cases):
    results, pos = [], 0

    def take(n):
        nonlocal pos
        pos += n
        return data[pos - n:pos]

    # A driver stopped by a sanitizer leaves a truncated file: the cases
    # written in full are kept.
    try:
        (count,) = struct.unpack("<I", take(4))
        for case in cases[:count]:
            (length,) = struct.unpack("<I", take(4))
            error = take(length).decode()
            (n,) = struct.unpack("<I", take(4))
            buffers = []
            for _ in range(n):
                (size,) = struct.unpack("<Q", take(8))
                buffers.append(take(size))
                if len(buffers[-1]) != size:
                    raise struct.error("truncated")
            results.append(Result(error, buffers, case.views))
    except struct.error:
        pass
    return results


# --- CEParams as csrc/binding.cpp fills them --------------------------------

def _shape_fields(case, x):
    n, c = x.shape[0], x.shape[1]
    inner = x.shape[2] if x.dim() == 3 else 1
    case.dtype = x.dtype
    case.ints.update(outer=n, classes=c, inner=inner, rows=n * inner, logits_outer_stride=x.stride(0))
    case.put("logits", x)


def _target_fields(case, x, target, weight, ignore_index, label_smoothing, logit_scale, softcap, class_offset,
                   total_classes):
    acc = acc_dtype(x.dtype)
    case.ints.update(ignore_index=ignore_index, class_offset=class_offset,
                     total_classes=x.shape[1] if total_classes is None else total_classes)
    case.floats.update(label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap)
    if target.dtype == torch.long:
        case.put("target_index", target.reshape(-1).contiguous())
    else:
        # The logits' dtype or the accumulation type, read as is.
        case.target_prob_acc = target.dtype != x.dtype
        case.ints["target_outer_stride"] = target.stride(0)
        case.put("target_prob", target)
    if weight is not None:
        case.put("weight", weight.to(acc).contiguous())
        if label_smoothing > 0 and target.dtype == torch.long:
            case.put("weight_sum", weight.to(acc).sum().reshape(1))


def forward_case(name, x, target, weight=None, *, ignore_index=-100, label_smoothing=0.0, logit_scale=1.0,
                 softcap=0.0, stats=False, class_offset=0, total_classes=None, inplace=False, grad_scale=1.0,
                 lse_grad_scale=None, token_weight=None, device=H100):
    """ce_forward (inplace=False) or ce_forward_inplace: x's rows must be in block layout."""
    case = Case("forward_inplace" if inplace else "forward", name, device)
    _shape_fields(case, x)
    _target_fields(case, x, target, weight, ignore_index, label_smoothing, logit_scale, softcap, class_offset,
                   total_classes)
    rows, acc = case.ints["rows"], acc_dtype(x.dtype)
    case.output("loss", (rows,), acc)
    case.output("lse", (rows,), torch.float64)
    if stats:
        case.output("entropy", (rows,), acc)
        case.output("pred", (rows,), torch.long)
        if target.dtype != torch.long:
            case.output("target_pred", (rows,), torch.long)
    if inplace:
        case.alias("grad", "logits")
        case.ints["grad_outer_stride"] = x.stride(0)
        case.put("grad_scale", torch.tensor([grad_scale], dtype=acc))
        if lse_grad_scale is not None:
            case.put("lse_grad_scale", torch.tensor([lse_grad_scale], dtype=acc))
        if token_weight is not None:
            case.put("row_weight", token_weight.to(acc).contiguous())
    return case


def backward_case(name, x, target, weight, lse, grad_output, grad_lse=None, *, grad_entropy=None, entropy=None,
                  grad_stride=None, grad_offset=0,
                  ignore_index=-100, label_smoothing=0.0, logit_scale=1.0, softcap=0.0, class_offset=0,
                  total_classes=None, device=H100):
    """ce_backward into a poisoned gradient of the given layout (contiguous by default)."""
    case = Case("backward", name, device)
    _shape_fields(case, x)
    _target_fields(case, x, target, weight, ignore_index, label_smoothing, logit_scale, softcap, class_offset,
                   total_classes)
    case.put("lse", lse.contiguous())
    case.put("grad_output", grad_output)
    case.ints["grad_output_stride"] = grad_output.stride(0)
    if grad_lse is not None:
        case.put("grad_lse", grad_lse.to(acc_dtype(x.dtype)).contiguous())
    if grad_entropy is not None:
        case.put("grad_entropy", grad_entropy.to(acc_dtype(x.dtype)).contiguous())
        case.put("entropy", entropy.to(acc_dtype(x.dtype)).contiguous())
    case.output("grad", tuple(x.shape), x.dtype, grad_stride, grad_offset)
    case.ints["grad_outer_stride"] = case.views["grad"].stride[0]
    return case


def scale_case(name, grad, grad_output, device=H100):
    """scale_grad_: grad (block layout) times one value (stride 0) or one per row."""
    case = Case("scale_rows", name, device)
    inner = grad.shape[2] if grad.dim() == 3 else 1
    case.dtype = grad.dtype
    case.ints.update(outer=grad.shape[0], classes=grad.shape[1], inner=inner, rows=grad.shape[0] * inner,
                     grad_outer_stride=grad.stride(0), grad_output_stride=grad_output.stride(0))
    case.put("grad", grad)
    case.put("grad_output", grad_output)
    return case
