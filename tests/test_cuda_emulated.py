"""The CUDA kernels (csrc/cuda/kernels.cu) run on the CPU under the emulation
of tools/cuda_emu, through the real launchers, in three builds: plain -O2,
ASan+UBSan and TSan. Every kernel family, phase and option is compared with
float64 PyTorch (or, for empty rows, with the CPU kernels).

The cases of all tests run in one driver process per build (started once,
the three side by side); each test then checks its case's buffers.
"""
import dataclasses
import functools
import re

import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce  # noqa: F401  (registers the CPU ops cpu_reference calls)
import emulated as E
from conftest import TOLERANCES, random_probs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclasses.dataclass
class Spec:
    """One launch and what it should produce."""

    name: str
    phase: str  # forward, forward_inplace, backward, scale_rows
    x: torch.Tensor  # logits (the gradient, for scale_rows), possibly a strided view
    target: torch.Tensor = None
    weight: torch.Tensor = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    softcap: float = 0.0
    class_offset: int = 0
    total_classes: int = None
    stats: bool = False
    device: int = E.H100
    grad_output: torch.Tensor = None  # backward and scale_rows, in the accumulation type
    grad_lse: torch.Tensor = None
    grad_entropy: torch.Tensor = None  # backward, with the reference's entropy
    token_weight: torch.Tensor = None  # in place, per row
    grad_scale: float = 1.0  # in place
    lse_grad_scale: float = None
    grad_stride: tuple = None  # backward: the gradient's layout
    grad_offset: int = 0
    against_cpu: bool = False  # compare with the CPU kernels instead of float64 PyTorch

    def options(self):
        return dict(ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                    logit_scale=self.logit_scale, softcap=self.softcap, class_offset=self.class_offset,
                    total_classes=self.total_classes)

    def case(self):
        if self.phase == "scale_rows":
            return E.scale_case(self.name, self.x, self.grad_output, self.device)
        if self.phase == "backward":
            return E.backward_case(self.name, self.x, self.target, self.weight, reference(self)["lse"],
                                   self.grad_output, self.grad_lse, grad_entropy=self.grad_entropy,
                                   entropy=reference(self)["entropy"] if self.grad_entropy is not None else None,
                                   grad_stride=self.grad_stride,
                                   grad_offset=self.grad_offset, device=self.device, **self.options())
        return E.forward_case(self.name, self.x, self.target, self.weight, stats=self.stats,
                              inplace=self.phase == "forward_inplace", grad_scale=self.grad_scale,
                              lse_grad_scale=self.lse_grad_scale, token_weight=self.token_weight,
                              device=self.device, **self.options())


# --- the float64 reference ----------------------------------------------------

def transform(z, scale, cap):
    """The logit transform as the kernels compute it (row_math.h)."""
    v = z * scale
    if cap:
        v = cap * torch.tanh(z * (scale * (1 / torch.tensor(cap, dtype=z.dtype))))
    return v


def as_rows(t):
    """(N, C) or (N, C, S) as (rows, C), rows ordered n * S + s."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if t.dim() == 3 else t


@functools.lru_cache(maxsize=None)
def _reference(spec_id):
    return _compute_reference(SPECS[spec_id])


def reference(spec):
    return _reference(spec.name) if spec.name in SPECS else _compute_reference(spec)


def _compute_reference(s):
    """loss, lse, entropy, pred, target_pred and the gradient, in float64 (skipped rows filled as the kernels do)."""
    z = s.x.detach().double().requires_grad_()
    v = as_rows(transform(z, s.logit_scale, s.softcap))
    rows, classes = v.shape
    total = s.total_classes or classes
    eps = s.label_smoothing
    lse = torch.logsumexp(v, 1) if classes else torch.full((rows,), -torch.inf, dtype=torch.float64)
    logp = v - lse[:, None]
    entropy = -(logp.exp() * logp).sum(1)
    w = s.weight.double() if s.weight is not None else torch.ones(classes, dtype=torch.float64)
    if s.target.is_floating_point():
        a = w * ((1 - eps) * as_rows(s.target.double()) + eps / total)
        loss = -(a * logp).sum(1)
        ignored = invalid = torch.zeros(rows, dtype=torch.bool)
    else:
        y = s.target.reshape(-1)
        ignored = y == s.ignore_index
        invalid = ~ignored & ((y < 0) | (y >= total))
        local = y - s.class_offset
        here = ~ignored & ~invalid & (local >= 0) & (local < classes)
        idx = local.clamp(0, max(classes - 1, 0))[:, None]
        loss = torch.zeros(rows, dtype=torch.float64)
        if classes:
            loss = torch.where(here, -(1 - eps) * w[idx[:, 0]] * logp.gather(1, idx)[:, 0], loss)
        if eps:
            loss = loss - eps / total * (w * logp).sum(1)
    keep = ~(ignored | invalid)
    if s.phase == "backward":
        g = s.grad_output.double().expand(rows)
        objective = (g * loss)[keep].sum()
        if s.grad_lse is not None:
            objective = objective + (s.grad_lse.double() * lse)[keep].sum()
        if s.grad_entropy is not None:
            objective = objective + (s.grad_entropy.double() * entropy)[keep].sum()
    else:  # the in-place forward's gradient: grad_scale * token_weight * dloss + z-loss
        tw = s.token_weight.double() if s.token_weight is not None else 1.0
        objective = s.grad_scale * (tw * loss)[keep].sum()
        if s.lse_grad_scale is not None:
            objective = objective + (s.lse_grad_scale / 2 * lse**2)[keep].sum()
    grad = torch.autograd.grad(objective, z, allow_unused=True)[0] if keep.any() and classes else None
    grad = torch.zeros_like(z) if grad is None else grad.clone()
    rows_of_grad = grad.movedim(1, -1) if grad.dim() == 3 else grad  # a view: rows indexed (N, S)
    rows_of_grad[ignored.view(rows_of_grad.shape[:-1])] = 0
    rows_of_grad[invalid.view(rows_of_grad.shape[:-1])] = torch.nan
    fill = torch.where(ignored, 0.0, torch.nan)
    out = {"loss": torch.where(keep, loss, fill).detach(), "lse": torch.where(keep, lse, fill).detach(),
           "grad": grad}
    if s.stats or s.grad_entropy is not None:
        out["entropy"] = torch.where(keep, entropy, fill).detach()
    if s.stats:
        acc = E.acc_dtype(s.x.dtype)
        pred = as_rows(transform(s.x.to(acc), s.logit_scale, s.softcap)).argmax(1) + s.class_offset
        out["pred"] = torch.where(keep, pred, -1)
        if s.target.is_floating_point():
            out["target_pred"] = torch.where(keep, as_rows(s.target).argmax(1), -1)
    return out


def cpu_reference(s):
    """The CPU kernels' outputs (for rows the float64 formula does not cover: no classes)."""
    ops = torch.ops.fused_softmax_ce
    o = s.options()
    o["total_classes"] = -1 if o["total_classes"] is None else o["total_classes"]
    x, target = s.x.clone(), s.target.reshape(-1)
    if s.phase == "forward":
        loss, lse, entropy, pred, _ = ops.ce_forward(x, target, s.weight, o["ignore_index"], o["label_smoothing"],
                                            o["logit_scale"], o["softcap"], s.stats, o["class_offset"],
                                            o["total_classes"])
        return {"loss": loss, "lse": lse, **({"pred": pred, "entropy": entropy} if s.stats else {})}
    acc = E.acc_dtype(x.dtype)
    loss, lse, entropy, pred, _ = ops.ce_forward_inplace(
        x, target, s.weight, torch.tensor(s.grad_scale, dtype=acc), o["ignore_index"], o["label_smoothing"],
        o["logit_scale"], o["softcap"], None, s.stats, s.token_weight, o["class_offset"], o["total_classes"])
    return {"loss": loss, "lse": lse, "grad": x, **({"pred": pred, "entropy": entropy} if s.stats else {})}


# --- the cases ----------------------------------------------------------------

def logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def index_target(x, ignore_every=0, invalid_row=None):
    rows = x.shape[0] * (x.shape[2] if x.dim() == 3 else 1)
    t = torch.randint(0, x.shape[1], (rows,))
    if ignore_every:
        t[::ignore_every] = -100
    if invalid_row is not None:
        t[invalid_row] = x.shape[1] + 3  # nan loss and gradient, never an address
    return t.view((x.shape[0],) + tuple(x.shape[2:]))


# Kernel paths: (logits shape, device). warp: rows_kernel<32>; rows:
# rows_kernel<256> (index backward with 2048 < C <= 8192 included); split:
# split_stats / split_finish / split_grad for index rows, rows_kernel<256>
# for probability rows; spatial: spatial_rows_kernel for plain 16- and 32-bit
# rows, spatial_kernel otherwise; spatial_odd: S not a multiple of 4.
PATHS = {"warp": ((11, 1000), E.H100), "rows": ((5, 3001), E.H100), "split": ((3, 16389), E.SMALL),
         "spatial": ((3, 17, 8), E.H100), "spatial_odd": ((3, 17, 7), E.H100)}
OPTIONS = ("plain", "smooth", "prob", "stats", "zloss", "softcap", "scale", "entropy")
PHASES = ("forward", "forward_inplace", "backward")


def grid_spec(path, option, phase, dtype_name):
    shape, device = PATHS[path]
    dtype = DTYPES[dtype_name]
    x = logits(shape, dtype)
    rows = shape[0] * (shape[2] if len(shape) == 3 else 1)
    acc = E.acc_dtype(dtype)
    s = Spec(f"{path}-{option}-{phase}-{dtype_name}", phase, x, index_target(x), device=device)
    if option == "smooth":
        s.target = index_target(x, ignore_every=4, invalid_row=1)
        s.weight, s.label_smoothing = torch.rand(shape[1], dtype=acc) + 0.5, 0.1
    elif option == "prob":
        s.target, s.weight, s.label_smoothing = random_probs(shape, dtype, "cpu"), torch.rand(shape[1]) + 0.5, 0.05
        s.stats = phase != "backward"
    elif option == "stats":
        s.target, s.stats = index_target(x, ignore_every=3), phase != "backward"
    elif option == "zloss":
        if phase == "backward":
            s.grad_lse = torch.randn(rows, dtype=acc)
        s.lse_grad_scale = 2e-2
    elif option == "softcap":
        s.logit_scale, s.softcap = 0.8, 15.0
    elif option == "scale":
        s.logit_scale = 1.7
    elif option == "entropy":  # the entropy's value, its gradient, token weights in place
        s.target, s.logit_scale, s.softcap = index_target(x, ignore_every=3, invalid_row=1), 1.2, 20.0
        s.stats = phase != "backward"
        if phase == "backward":
            s.grad_entropy = torch.randn(rows, dtype=acc)
        elif phase == "forward_inplace":
            s.token_weight = torch.randn(rows, dtype=acc)
    if phase == "backward":
        # A stride-0 grad_output (the mean's) for smoothing, one per row otherwise.
        s.grad_output = (torch.tensor([0.37], dtype=acc).expand(rows) if option == "smooth"
                         else torch.randn(rows, dtype=acc))
    else:
        s.grad_scale = 0.37
    return s


def split_boundary_specs():
    """Rows 2 * SM - 1 and 2 * SM, C around 4 * kMinChunk, with argmax ties
    and nan in different chunks (statistics on)."""
    specs = []
    sm = E.DEVICES[E.SMALL][0]
    for rows in (2 * sm - 1, 2 * sm):
        for classes in (16383, 16384, 16385):
            for dtype_name in ("fp32", "bf16"):
                for phase in ("forward", "forward_inplace"):
                    x = logits((rows, classes), DTYPES[dtype_name])
                    x[0, 5] = x[0, classes - 3] = 40  # a tie across chunks: the first wins
                    x[1, classes - 10] = x[1, 50] = torch.nan  # the first nan is the argmax
                    x[2, classes // 2 - 1] = x[2, classes // 2] = 40  # a tie across a chunk border
                    specs.append(Spec(f"split_boundary-{rows}x{classes}-{phase}-{dtype_name}", phase, x,
                                      index_target(x), stats=True, device=E.SMALL, grad_scale=0.5))
    return specs


def offset_specs():
    """Storage offsets of 0 to 7 elements and row-padded logits; the
    backward's gradient padded and offset too."""
    specs = []
    for path, classes in (("warp", 999), ("rows", 3001)):
        for offset in range(8):
            for dtype_name in ("bf16", "fp32") if offset in (1, 2) else ("bf16",):
                dtype = DTYPES[dtype_name]
                pad = 5 + offset
                for phase in PHASES:
                    base = logits((6 * (classes + pad) + offset,), dtype)
                    x = base.as_strided((6, classes), (classes + pad, 1), offset)
                    target = index_target(x, ignore_every=4)
                    s = Spec(f"offset{offset}-{path}-{phase}-{dtype_name}", phase, x, target, label_smoothing=0.1,
                             weight=torch.rand(classes) + 0.5, grad_scale=0.5)
                    if phase == "backward":
                        s.grad_output = torch.randn(6, dtype=E.acc_dtype(dtype))
                        s.grad_stride, s.grad_offset = (classes + 7 - offset, 1), 7 - offset
                    specs.append(s)
    return specs


def row_cache_specs():
    """In-place rows in shared memory: at 48 KB (the opt-in's edge: the
    emulation counts no static memory), at the device's largest cached row
    and one element past it, on H100 and on A100's smaller shared memory."""
    specs = []
    cases = [("bf16", 24576, E.TINY), ("bf16", 24584, E.TINY), ("bf16", 57344, E.TINY), ("bf16", 57345, E.TINY),
             ("fp64", 14336, E.TINY), ("fp64", 14337, E.TINY), ("fp32", 20480, E.A100_SMEM),
             ("fp32", 20484, E.A100_SMEM)]
    for dtype_name, classes, device in cases:
        x = logits((2, classes), DTYPES[dtype_name])
        specs.append(Spec(f"row_cache-{classes}-{dtype_name}-dev{device}", "forward_inplace", x, index_target(x),
                          device=device, grad_scale=0.5, lse_grad_scale=1e-2))
    return specs


def scale_specs():
    """scale_grad_ by rows of each walker (1, 32 and 256 threads), with a
    stride-0 grad_output (1, skipped, and 2.5) and one per row."""
    specs = []
    for shape in ((3, 17, 7), (11, 1000), (5, 3001)):
        for dtype_name in ("fp32", "bf16"):
            rows = shape[0] * (shape[2] if len(shape) == 3 else 1)
            acc = E.acc_dtype(DTYPES[dtype_name])
            for kind, go in (("one", torch.ones(1, dtype=acc).expand(rows)),
                             ("scalar", torch.full((1,), 2.5, dtype=acc).expand(rows)),
                             ("rows", torch.randn(rows, dtype=acc))):
                specs.append(Spec(f"scale-{'x'.join(map(str, shape))}-{kind}-{dtype_name}", "scale_rows",
                                  logits(shape, DTYPES[dtype_name]), grad_output=go))
    return specs


def shard_specs():
    """A vocab-parallel shard: classes [7, 7 + C) of C + 30, targets in other
    shards too, smoothing over the total class count, the lse's gradient."""
    specs = []
    for path in ("warp", "rows"):
        shape, device = PATHS[path]
        for dtype_name in ("fp32", "bf16"):
            for phase in PHASES:
                x = logits(shape, DTYPES[dtype_name])
                target = torch.randint(0, shape[1] + 30, (shape[0],))
                target[0] = -100
                s = Spec(f"shard-{path}-{phase}-{dtype_name}", phase, x, target, class_offset=7,
                         total_classes=shape[1] + 30, label_smoothing=0.1, stats=phase != "backward",
                         device=device, grad_scale=0.5)
                if phase == "backward":
                    s.grad_output = torch.randn(shape[0], dtype=E.acc_dtype(x.dtype))
                    s.grad_lse = torch.randn(shape[0], dtype=E.acc_dtype(x.dtype))
                specs.append(s)
    return specs


def misc_specs():
    """Probability targets in float32 with half logits (autocast's case), and
    shards without classes (compared with the CPU kernels)."""
    specs = []
    for path in ("warp", "rows"):
        shape, device = PATHS[path]
        for phase in PHASES:
            x = logits(shape, torch.bfloat16)
            s = Spec(f"prob_fp32-{path}-{phase}", phase, x, random_probs(shape, torch.float32, "cpu"),
                     stats=phase != "backward", device=device, grad_scale=0.5)
            if phase == "backward":
                s.grad_output = torch.randn(shape[0])
            specs.append(s)
    for phase in PHASES:  # fewer classes than a warp's lanes and a vector's elements
        x = logits((9, 5), torch.float32)
        s = Spec(f"few_classes-{phase}", phase, x, index_target(x), grad_scale=0.5)
        if phase == "backward":
            s.grad_output = torch.randn(9)
        specs.append(s)
    for shape in ((3, 0), (2, 0, 5)):
        for phase in ("forward", "forward_inplace"):
            x = torch.empty(shape, dtype=torch.float32)
            target = torch.randint(0, 10, (shape[0],) + shape[2:])
            specs.append(Spec(f"no_classes-{'x'.join(map(str, shape))}-{phase}", phase, x, target,
                              total_classes=10, class_offset=3, label_smoothing=0.1, stats=True, against_cpu=True))
    return specs


def all_specs():
    torch.manual_seed(0)
    specs = [grid_spec(p, o, ph, d) for p in PATHS for o in OPTIONS for ph in PHASES for d in DTYPES]
    specs += split_boundary_specs() + offset_specs() + row_cache_specs() + scale_specs() + shard_specs()
    specs += misc_specs()
    return {s.name: s for s in specs}


SPECS = all_specs()


@pytest.fixture(scope="session")
def batches():
    """Every case through each build, the three drivers side by side."""
    E.build()
    names = list(SPECS)
    runs = E.run_variants([SPECS[n].case() for n in names])
    return {v: (dict(zip(names, b.results)), b) for v, b in runs.items()}


def tolerance(dtype, output):
    """Per-row outputs are in the accumulation type; the gradient in the logits' dtype."""
    if output in ("loss", "lse", "entropy"):
        dtype = E.acc_dtype(dtype)
    return TOLERANCES[dtype]


@pytest.mark.parametrize("variant", E.VARIANTS)
@pytest.mark.parametrize("name", list(SPECS))
def test_kernel_matches_float64(batches, variant, name):
    results, batch = batches[variant]
    assert name in results, f"the {variant} driver stopped before this case (rc {batch.returncode}):\n{batch.log[-6000:]}"
    check(SPECS[name], results[name])


def check(s, got):
    """Raises AssertionError unless the launch wrote what the reference says."""
    assert got.error == "", got.error
    if s.phase == "scale_rows":  # grad_output holds one value per row, rows ordered n * S + s
        per_row = (s.x.shape[0], 1) + tuple(s.x.shape[2:])
        expected = {"grad": s.x.double() * s.grad_output.double().reshape(per_row)}
    else:
        expected = dict(cpu_reference(s) if s.against_cpu else reference(s))
    if s.phase == "forward":
        expected.pop("grad", None)
    elif s.phase == "backward":
        expected = {"grad": expected["grad"]}
    for output, want in expected.items():
        have = got[output]
        if want.dtype == torch.long:
            assert torch.equal(have, want), f"{output}: {have} != {want}"
        else:
            atol, rtol = tolerance(s.x.dtype, output)
            torch.testing.assert_close(have.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True,
                                       msg=lambda m, o=output: f"{o}: {m}")
    if s.phase == "forward_inplace" and s.x.numel() and s.x.stride(0) > s.x[0].numel():  # row-padded
        check_padding_untouched(s.x, got)


BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_padding_untouched(x, got):
    """In place, the elements between rows (row padding) keep their bits."""
    view = got.views["logits"]
    before = torch.frombuffer(bytearray(E.storage_span(x)[0]), dtype=BITS[x.element_size()])
    after = torch.frombuffer(bytearray(got.buffers[view.buffer]), dtype=BITS[x.element_size()])
    covered = torch.zeros(before.numel(), dtype=torch.bool)
    covered.as_strided(view.shape, view.stride, view.offset).fill_(True)
    assert torch.equal(after[~covered], before[~covered])


@pytest.mark.parametrize("variant", E.VARIANTS)
def test_driver_exits_cleanly(batches, variant):
    """A sanitizer report or an emulation error ends the driver non-zero."""
    _, batch = batches[variant]
    assert batch.returncode == 0, batch.log[-6000:]


def kernel_families():
    """The __global__ functions of csrc/cuda's cross-entropy (jsd.cu has its
    own driver and tests: tests/test_jsd_emulated.py)."""
    source = "".join(p.read_text() for p in sorted((E.ROOT / "csrc" / "cuda").glob("*.cu*"))
                     if not p.name.startswith("jsd"))
    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", source))


def test_every_kernel_family_is_reached(batches):
    """A kernel added to kernels.cu without an emulated case fails here."""
    families = kernel_families()
    assert len(families) >= 7
    _, batch = batches["plain"]
    assert families <= set(batch.launches), f"never launched: {families - set(batch.launches)}"


def test_device_values_are_cached_per_device():
    """The SM count, the row-cache size and the kernels' attributes are
    queried once per device, not per launch, and each device gets its own."""
    def specs(repeats):
        out = []
        for k in range(repeats):
            for device in (E.TINY, E.A100_SMEM):
                x = logits((2, 20480), torch.float32)
                out.append(Spec(f"cache-{k}-{device}", "forward_inplace", x, index_target(x), device=device))
        return out

    counts = []
    for repeats in (1, 3):
        batch = E.run([s.case() for s in specs(repeats)], "plain")
        assert batch.returncode == 0, batch.log
        for s, r in zip(specs(repeats), batch.results):
            assert r.error == ""
        counts.append(batch.queries)
    assert counts[0] == counts[1], counts
    # The SM count and two shared-memory sizes per device, one kernel's attributes per device.
    assert counts[0] == {"device": 6, "function": 2}
