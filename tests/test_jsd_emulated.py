"""The generalized JSD's CUDA kernels (csrc/cuda/jsd.cu) on the CPU under the
emulation of tools/cuda_emu (plain, ASan+UBSan, TSan builds of
jsd_driver), through the real launchers, against TRL's formula in float64.
Outputs start poisoned (nan bytes)."""
import dataclasses
import itertools
import re
import struct

import pytest
import torch

import emulated as E
from fused_softmax_ce._jsd_ops import ROW_STATS, ops
from jsd_reference import reference

INTS = ("rows", "classes", "student_stride", "teacher_stride", "ignore_index", "grad_output_stride", "grad_stride")
FLOATS = ("beta", "temperature")
POINTERS = ("student", "teacher", "labels", "loss", "row_stats", "grad_output", "grad")  # jsd_driver.cpp's order
OPS = {"forward": 0, "backward": 1}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# (atol, rtol): the loss is in the accumulation type; the gradient in the logits' dtype.
LOSS_TOL = {torch.float64: (1e-12, 1e-10)}
GRAD_TOL = {torch.float32: (2e-6, 2e-5), torch.float64: (1e-15, 1e-10), torch.float16: (1e-6, 2e-3),
            torch.bfloat16: (1e-5, 1e-2)}


class JsdCase(E.Case):
    """One launch: JsdParams' fields, filled as csrc/jsd_binding.cpp fills them."""

    def __init__(self, op, name, student, teacher, labels, beta, temperature, ignore_index, device=E.H100):
        super().__init__(op, name, device)
        self.ints = dict.fromkeys(INTS, 0)
        self.floats = dict(beta=beta, temperature=temperature)
        self.dtype = student.dtype
        rows, classes = student.shape
        self.ints.update(rows=rows, classes=classes, student_stride=student.stride(0),
                         teacher_stride=teacher.stride(0), ignore_index=ignore_index)
        self.put("student", student)
        self.put("teacher", teacher)
        if labels is not None:
            self.put("labels", labels.contiguous())

    def encode(self):
        out = [struct.pack("<iii", OPS[self.op], self.device, E.DTYPE_CODES[self.dtype]),
               struct.pack("<" + "q" * len(INTS), *(self.ints[k] for k in INTS)),
               struct.pack("<" + "d" * len(FLOATS), *(self.floats[k] for k in FLOATS))]
        out += [struct.pack("<iq", *self.pointers.get(f, (-1, 0))) for f in POINTERS]
        out.append(struct.pack("<I", len(self.buffers)))
        out += [struct.pack("<Q", len(d)) + d for d in self.buffers]
        return b"".join(out)


@dataclasses.dataclass
class Spec:
    name: str
    phase: str  # forward, backward, backward_inplace
    student: torch.Tensor  # (rows, V), possibly row-strided
    teacher: torch.Tensor
    labels: torch.Tensor = None
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    grad_output: torch.Tensor = None  # (rows,) or one element (stride 0)
    want_loss: torch.Tensor = None  # instead of the reference's (where TRL's formula gives nan)

    def options(self):
        return (self.beta, self.temperature, self.ignore_index)

    def case(self):
        acc = E.acc_dtype(self.student.dtype)
        rows = self.student.shape[0]
        c = JsdCase("forward" if self.phase == "forward" else "backward", self.name, self.student, self.teacher,
                    self.labels, *self.options())
        if self.phase == "forward":
            c.output("loss", (rows,), acc)
            c.output("row_stats", (rows, ROW_STATS), acc)
            return c
        _, stats = ops.jsd_forward(self.student, self.teacher, self.labels, *self.options())
        c.put("row_stats", stats)
        c.put("grad_output", self.grad_output)
        c.ints["grad_output_stride"] = 0 if self.grad_output.numel() == 1 else 1
        if self.phase == "backward_inplace":
            c.alias("grad", "student")
            c.ints["grad_stride"] = self.student.stride(0)
        else:
            c.output("grad", tuple(self.student.shape), self.student.dtype)
            c.ints["grad_stride"] = self.student.shape[1]
        return c

    def expected(self):
        s = self.student.double().clone().requires_grad_()
        kw = dict(beta=self.beta, temperature=self.temperature, ignore_index=self.ignore_index, reduction="none")
        loss = reference(s, self.teacher, self.labels, **kw)
        if self.phase == "forward":
            _, stats = ops.jsd_forward(self.student, self.teacher, self.labels, *self.options())
            return {"loss": loss.detach() if self.want_loss is None else self.want_loss, "row_stats": stats}
        g = self.grad_output.double().expand(loss.shape)
        (loss * g).sum().backward()
        return {"grad": s.grad}


def logits(rows, classes, dtype, scale=3.0, row_stride=None):
    x = torch.randn(rows, row_stride or classes, dtype=torch.float64) * scale
    return x[:, :classes].to(dtype) if row_stride is None else x.to(dtype)[:, 3:3 + classes]


def all_specs():
    torch.manual_seed(0)
    specs = []
    for (dname, dtype), beta, phase in itertools.product(DTYPES.items(), (0.0, 0.3, 1.0),
                                                         ("forward", "backward", "backward_inplace")):
        for classes, rows in ((5, 3), (300, 4), (1000, 2)):
            acc = E.acc_dtype(dtype)
            labels = torch.tensor([1, -100, 2, 0][:rows]) if classes == 300 else None
            strided = classes == 1000  # rows padded apart, as a slice of wider logits
            student = logits(rows, classes, dtype, row_stride=classes + 11 if strided else None)
            teacher = logits(rows, classes, dtype, 2.0)
            go = torch.rand(rows, dtype=acc) + 0.5 if classes != 5 else torch.full((1,), 0.7, dtype=acc)
            if phase == "backward_inplace" and strided:
                student = student.contiguous()  # the binding refuses an in-place gradient it would copy
            specs.append(Spec(f"{phase}-{dname}-beta{beta}-V{classes}", phase, student, teacher, labels, beta,
                              1.0 if classes == 5 else 2.0, grad_output=None if phase == "forward" else go))
    # Every row ignored, and all -inf teacher logits but one (a 0 * -inf term).
    x = logits(3, 40, torch.float32)
    specs.append(Spec("forward-all-ignored", "forward", x, x.clone(), torch.full((3,), 7), ignore_index=7))
    t = torch.full((2, 40), float("-inf"))
    t[:, 5] = 0.0
    x = logits(2, 40, torch.float32)
    specs.append(Spec("forward-inf-teacher", "forward", x, t, beta=0.0,
                      want_loss=-torch.log_softmax(x.double(), -1)[:, 5]))
    return {s.name: s for s in specs}


SPECS = all_specs()


@pytest.fixture(scope="session")
def batches():
    E.build(driver="jsd_driver")
    names = list(SPECS)
    runs = E.run_variants([SPECS[n].case() for n in names], driver="jsd_driver")
    return {v: (dict(zip(names, b.results)), b) for v, b in runs.items()}


@pytest.mark.parametrize("variant", E.VARIANTS)
@pytest.mark.parametrize("name", list(SPECS))
def test_kernel_matches_float64(batches, variant, name):
    results, batch = batches[variant]
    assert name in results, f"the {variant} driver stopped before this case (rc {batch.returncode}):\n{batch.log[-6000:]}"
    got, spec = results[name], SPECS[name]
    assert got.error == "", got.error
    for output, want in spec.expected().items():
        have = got[output]
        if output == "grad":
            atol, rtol = GRAD_TOL[spec.student.dtype]
        else:
            atol, rtol = LOSS_TOL.get(spec.student.dtype, (2e-6, 2e-5))
        torch.testing.assert_close(have.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m, o=output: f"{o}: {m}")


@pytest.mark.parametrize("variant", E.VARIANTS)
def test_driver_exits_cleanly(batches, variant):
    _, batch = batches[variant]
    assert batch.returncode == 0, batch.log[-6000:]


def test_every_kernel_is_reached(batches):
    source = (E.ROOT / "csrc" / "cuda" / "jsd.cu").read_text()
    families = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", source))
    assert families == {"jsd_forward_kernel", "jsd_backward_kernel"}
    _, batch = batches["plain"]
    assert families <= set(batch.launches), f"never launched: {families - set(batch.launches)}"
