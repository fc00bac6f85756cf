"""The CPU kernel sets (issue 20): cpu_isa() names the one that runs, and
FSCE_CPU_ISA picks another this CPU runs. Every set this machine runs is
checked against PyTorch in float64 on a slice of the cases (dtypes, 2-D and
spatial layouts, the options), and against the others bit for bit where their
arithmetic is the same. The whole suite runs under one set with
FSCE_CPU_ISA=<set> pytest."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from conftest import TOLERANCES, assert_close, random_logits, random_target


def _cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _expected_sets(flags):
    """The sets an x86-64 CPU with these /proc/cpuinfo flags runs, widest first."""
    v3 = {"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    return ((["avx512-bf16"] if v4 and "avx512_bf16" in flags else []) + (["avx512"] if v4 else [])
            + (["avx2"] if v3 else []) + ["baseline"])


FLAGS = _cpu_flags()
X86_LINUX = FLAGS is not None and os.uname().machine == "x86_64"
SETS = _expected_sets(FLAGS) if X86_LINUX else ["baseline"]


@pytest.fixture
def cpu_set(monkeypatch):
    """Runs the test's launches on the named set (FSCE_CPU_ISA is read at every launch)."""
    def use(name):
        monkeypatch.setenv("FSCE_CPU_ISA", name)
        assert fce.cpu_isa() == name
    return use


@pytest.mark.skipif(not X86_LINUX, reason="reads the x86-64 flags of /proc/cpuinfo")
def test_default_is_the_widest_set_the_cpu_runs(monkeypatch):
    monkeypatch.delenv("FSCE_CPU_ISA", raising=False)
    assert fce.cpu_isa() == SETS[0]


def test_a_set_the_cpu_does_not_run_is_an_error(monkeypatch):
    monkeypatch.setenv("FSCE_CPU_ISA", "avx1024")
    with pytest.raises(RuntimeError, match="FSCE_CPU_ISA=avx1024 .* it runs: " + ", ".join(SETS)):
        fce.cpu_isa()
    with pytest.raises(RuntimeError, match="FSCE_CPU_ISA=avx1024"):
        fce.cross_entropy(torch.randn(4, 5), torch.randint(0, 5, (4,)))


# (shape, options): 2-D rows whose class count is no multiple of any lane
# count, and spatial ones whose inner size is none either.
CASES = [
    ((9, 1000), {}),
    ((5, 37), {"label_smoothing": 0.1, "weight": True, "ignore_index": 3}),
    ((6, 53), {"prob": True, "softcap": 5.0}),
    ((4, 300), {"logit_scale": 0.7, "inplace_backward": True}),
    ((3, 21, 5, 7), {}),
    ((2, 6, 37), {"label_smoothing": 0.2, "weight": True, "ignore_index": 1}),
    ((2, 5, 19), {"prob": True, "logit_scale": 1.5}),
    ((3, 4, 23), {"softcap": 4.0, "inplace_backward": True}),
]


def _run(x, target, weight, opts, reduction="sum"):
    """Loss and gradient of cross_entropy with these options."""
    kwargs = {k: v for k, v in opts.items() if k in ("label_smoothing", "ignore_index", "logit_scale", "softcap")}
    leaf = x.detach().clone().requires_grad_()
    inplace = opts.get("inplace_backward", False)
    # In place, the kernel overwrites a non-leaf.
    loss = fce.cross_entropy(leaf * 1 if inplace else leaf, target, weight=weight, reduction=reduction,
                             inplace_backward=inplace, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def _reference(x, target, weight, opts):
    x64 = x.double().clone().requires_grad_()
    v = x64 * opts.get("logit_scale", 1.0)
    if "softcap" in opts:
        v = opts["softcap"] * torch.tanh(v / opts["softcap"])
    t = target.double() if target.is_floating_point() else target
    loss = F.cross_entropy(v, t, weight=None if weight is None else weight.double(), reduction="sum",
                           label_smoothing=opts.get("label_smoothing", 0.0),
                           ignore_index=opts.get("ignore_index", -100))
    loss.backward()
    return loss.detach(), x64.grad


def _inputs(shape, dtype, opts):
    x = random_logits(shape, dtype, "cpu")
    target = random_target(shape, dtype, "cpu", opts.get("prob", False), opts.get("ignore_index"))
    weight = torch.rand(shape[1], dtype=torch.float64).add(0.5).to(dtype) if opts.get("weight") else None
    return x, target, weight


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape,opts", CASES)
def test_each_set_matches_float64(cpu_set, name, dtype, shape, opts):
    torch.manual_seed(20)
    x, target, weight = _inputs(shape, dtype, opts)
    expected_loss, expected_grad = _reference(x, target, weight, opts)
    cpu_set(name)
    loss, grad = _run(x, target, weight, opts)
    atol, rtol = TOLERANCES[dtype]
    # The summed loss adds up every row's error.
    torch.testing.assert_close(loss.double(), expected_loss, atol=atol * x.numel() / shape[1], rtol=rtol)
    assert_close(grad, expected_grad, dtype)


def _outputs(x, target, opts):
    loss, grad = _run(x, target, None, opts)
    return torch.cat([loss.reshape(-1).double(), grad.reshape(-1).double()])


def _assert_same_bits(a, b):
    assert torch.equal(a.view(torch.int64), b.view(torch.int64))


# Spatial rows are one lane each from start to end, so 16 lanes and 8 give
# the same bits wherever both have FMA (all but the baseline).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,opts", [c for c in CASES if len(c[0]) > 2 and not c[1].get("weight")])
def test_spatial_rows_are_the_same_bits_on_every_fma_set(cpu_set, dtype, shape, opts):
    fma_sets = [s for s in SETS if s != "baseline"]
    if len(fma_sets) < 2:
        pytest.skip(f"this CPU runs one set with FMA ({fma_sets})")
    torch.manual_seed(21)
    x, target, _ = _inputs(shape, dtype, opts)
    results = []
    for name in fma_sets:
        cpu_set(name)
        results.append(_outputs(x, target, opts))
    for other in results[1:]:
        _assert_same_bits(other, results[0])


def _bits16(t):
    return t.view(torch.int16)


@pytest.mark.skipif("avx512-bf16" not in SETS, reason="this CPU has no AVX512-BF16")
def test_hardware_bf16_stores_keep_denormals_and_nan_as_software_rounding(cpu_set):
    # vcvtneps2bf16 flushes denormals and keeps nan payloads: rows spread
    # over 200 units have gradients far below 2^-126 (bf16 denormals), and a
    # nan logit makes its row's gradient nan.
    torch.manual_seed(22)
    x = (torch.rand(8, 4096, dtype=torch.float64) * 200 - 100).to(torch.bfloat16)
    x[3, 7] = float("nan")
    target = torch.randint(0, 4096, (8,))
    grads = {}
    for name in ("avx512-bf16", "avx512"):
        cpu_set(name)
        # The mean's 1/8 takes exp2v's floor, 2^-126, below the normal range.
        _, grads[name] = _run(x, target, None, {}, reduction="mean")
    g = grads["avx512"]
    finite = g[g.isfinite() & (g != 0)].float().abs()
    assert (finite < torch.finfo(torch.float32).tiny).any()  # denormals were written
    assert g[3].isnan().all()
    assert torch.equal(_bits16(grads["avx512-bf16"]), _bits16(g))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_gradients_have_c10s_bits_on_every_set(cpu_set, dtype):
    # F16C's vcvtps2ph (and vcvtneps2bf16) keep a nan's payload; c10 writes
    # one quiet nan, which the baseline's conversion does.
    torch.manual_seed(23)
    x = random_logits((4, 77), dtype, "cpu")
    x[1, 5] = float("nan")
    target = torch.randint(0, 77, (4,))
    grads = []
    for name in SETS:
        cpu_set(name)
        grads.append(_run(x, target, None, {})[1])
    assert grads[-1][1].isnan().all()
    for g in grads[:-1]:
        assert torch.equal(_bits16(g), _bits16(grads[-1]))
