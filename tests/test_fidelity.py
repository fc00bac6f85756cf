"""Drop-in fidelity beyond plain eager calls: autocast, higher-order and
functional autograd, the in-place rules, compile with soft targets, edge
parity, layouts, and the host-side CUDA launch plan."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fused_softmax_ce as fce
from conftest import (DEVICES, assert_close, compare_with_eager, device_param, random_logits, random_probs,
                      random_target, random_targets)

ops = torch.ops.fused_softmax_ce

OPTIONS = [
    dict(),
    dict(label_smoothing=0.2),
    dict(weighted=True),
    dict(weighted=True, label_smoothing=0.1, ignore=True),
    dict(prob=True),
    dict(prob=True, weighted=True, label_smoothing=0.3),
]


def problem(device, shape=(5, 7), weighted=False, label_smoothing=0.0, ignore=False, prob=False,
            dtype=torch.float64):
    """Fresh logits, target and keyword arguments for one option set."""
    c = shape[1]
    logits = random_logits(shape, dtype, device)
    target = random_target(shape, dtype, device, prob, ignore_index=-100 if ignore else None, ignore_every=3)
    kwargs = dict(label_smoothing=label_smoothing)
    if weighted:
        kwargs["weight"] = (torch.rand(c, dtype=torch.float64, device=device) + 0.1).to(dtype)
    return logits, target, kwargs


def ids(options):
    return "-".join(f"{k}={v}" for k, v in options.items()) or "plain"


# ------------------------------------------------------------------ autocast

@device_param()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_autocast_matches_pytorch(device, dtype, reduction, prob):
    logits = random_logits((6, 37), dtype, device)
    if prob:
        target = random_probs((6, 37), torch.float32, device)
    else:
        target = random_targets(37, (6,), device, ignore_index=-100)
    weight = torch.rand(37, device=device) + 0.1  # float32, as autocast users have it
    x = logits.clone().requires_grad_()
    x_ref = logits.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        out = fce.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        expected = F.cross_entropy(x_ref, target, weight=weight, reduction=reduction, label_smoothing=0.1)
    assert out.dtype == expected.dtype == torch.float32
    assert_close(out, expected, torch.float32)
    grad = torch.rand_like(expected) + 0.5
    out.backward(grad)
    expected.backward(grad)
    assert x.grad.dtype == x_ref.grad.dtype == dtype
    assert_close(x.grad, x_ref.grad, dtype)


@device_param()
def test_autocast_keeps_checks_and_float64(device):
    x = random_logits((4, 5), torch.bfloat16, device)
    y = random_targets(5, (4,), device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="expected scalar type Float but found Double"):
            fce.cross_entropy(x, y, weight=torch.rand(5, dtype=torch.float64, device=device))
        x64 = random_logits((4, 5), torch.float64, device)
        assert fce.cross_entropy(x64, y).dtype == torch.float64
    with pytest.raises(RuntimeError, match="expected scalar type BFloat16 but found Float"):
        fce.cross_entropy(x, y, weight=torch.rand(5, device=device))


# ------------------------------------------------------- higher-order autograd

@device_param()
@pytest.mark.parametrize("options", OPTIONS, ids=ids)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_matches_pytorch(device, options, reduction):
    logits, target, kwargs = problem(device, **options)
    target_ref = target.clone().requires_grad_(target.is_floating_point())
    target_ours = target.clone().requires_grad_(target.is_floating_point())
    results = []
    for fn, t in ((fce.cross_entropy, target_ours), (F.cross_entropy, target_ref)):
        x = logits.clone().requires_grad_()
        loss = fn(x, t, reduction=reduction, **kwargs)
        v = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=device).reshape(loss.shape)
        (g,) = torch.autograd.grad(loss, x, v, create_graph=True)
        # A gradient penalty: differentiates the backward itself.
        penalty = (g * torch.cos(torch.arange(g.numel(), device=device).reshape(g.shape))).sum() + (g**2).sum()
        inputs = (x, t) if t.requires_grad else (x,)
        results.append(torch.autograd.grad(penalty, inputs))
    for ours, ref in zip(*results):
        assert_close(ours, ref, torch.float64)


@device_param()
@pytest.mark.parametrize("options", OPTIONS, ids=ids)
def test_gradgradcheck(device, options):
    logits, target, kwargs = problem(device, shape=(3, 4), **options)
    x = logits.requires_grad_()
    inputs = (x, target.requires_grad_()) if target.is_floating_point() else (x,)

    def fn(*args):
        t = args[1] if len(args) > 1 else target
        return fce.cross_entropy(args[0], t, reduction="none", **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@device_param()
def test_gradgradcheck_kdim_and_lse(device):
    logits, target, kwargs = problem(device, shape=(2, 4, 3), weighted=True, label_smoothing=0.1)
    x = logits.requires_grad_()

    def fn(z):
        loss, lse, _, _, _ = ops.ce_forward(z, target.reshape(-1), kwargs["weight"], -100, 0.1)
        return loss + lse**2  # the lse output is differentiable too

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@device_param()
def test_inplace_refuses_double_backward_and_second_backward(device):
    x = random_logits((4, 9), torch.float32, device).requires_grad_()
    y = random_targets(9, (4,), device)
    loss = fce.cross_entropy(x * 2, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(loss, x, create_graph=True)
    loss = fce.cross_entropy(x * 2, y, reduction="sum", inplace_backward=True)
    loss.backward(torch.tensor(3.0, device=device), retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward(torch.tensor(3.0, device=device))
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref * 2, y, reduction="sum").backward(torch.tensor(3.0, device=device))
    assert_close(first, x_ref.grad, torch.float32)


# ------------------------------------------------------------------ torch.func

def _both(fn_name, options, device, transform):
    """transform(loss_fn) applied to ours and to PyTorch's, on the same inputs."""
    logits, target, kwargs = problem(device, **options)

    def make(fn):
        return lambda z: fn(z, target, **kwargs)

    return transform(make(fce.cross_entropy), logits), transform(make(F.cross_entropy), logits)


@device_param()
@pytest.mark.parametrize("options", OPTIONS, ids=ids)
@pytest.mark.parametrize("name", ["grad", "jacrev", "jacfwd", "hessian", "jvp"])
def test_torch_func_matches_pytorch(device, options, name):
    def transform(fn, z):
        if name == "grad":
            return torch.func.grad(fn)(z)
        if name == "jacrev":
            return torch.func.jacrev(lambda z: fn(z) * 1.0)(z)
        if name == "jacfwd":
            return torch.func.jacfwd(fn)(z)
        if name == "hessian":
            return torch.func.hessian(fn)(z)
        tangent = torch.sin(torch.arange(z.numel(), dtype=z.dtype, device=z.device) * 1.7).reshape(z.shape)
        return torch.func.jvp(fn, (z,), (tangent,))[1]

    ours, ref = _both(name, options, device, transform)
    assert_close(ours, ref, torch.float64)


@device_param()
@pytest.mark.parametrize("options", OPTIONS, ids=ids)
def test_vmap_of_grad_matches_pytorch(device, options):
    batch = [problem(device, **options) for _ in range(3)]
    logits = torch.stack([b[0] for b in batch])
    target = torch.stack([b[1] for b in batch])
    kwargs = batch[0][2]  # the weight and options are shared by the batch

    def per_sample(fn):
        return torch.func.vmap(torch.func.grad(lambda z, t: fn(z, t, **kwargs)))(logits, target)

    assert_close(per_sample(fce.cross_entropy), per_sample(F.cross_entropy), torch.float64)


@device_param()
def test_vmap_with_batched_weight_and_unbatched_target(device):
    logits = random_logits((3, 4, 6), torch.float64, device)
    target = random_targets(6, (4,), device)
    weight = torch.rand(3, 6, dtype=torch.float64, device=device) + 0.1

    def run(fn):
        return torch.func.vmap(lambda z, w: fn(z, target, weight=w, reduction="none"))(logits, weight)

    assert_close(run(fce.cross_entropy), run(F.cross_entropy), torch.float64)


@device_param()
@pytest.mark.parametrize("options", OPTIONS, ids=ids)
def test_forward_ad_matches_pytorch(device, options):
    logits, target, kwargs = problem(device, **options)
    tangent = torch.randn_like(logits)
    results = []
    for fn in (fce.cross_entropy, F.cross_entropy):
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(logits, tangent)
            out = fn(dual, target, reduction="none", **kwargs)
            results.append(forward_ad.unpack_dual(out).tangent)
    assert_close(results[0], results[1], torch.float64)


@device_param()
def test_forward_ad_of_soft_target(device):
    logits, target, kwargs = problem(device, prob=True, weighted=True, label_smoothing=0.1)
    tangent = torch.randn_like(target)
    results = []
    for fn in (fce.cross_entropy, F.cross_entropy):
        results.append(torch.func.jvp(lambda t: fn(logits, t, **kwargs), (target,), (tangent,))[1])
    assert_close(results[0], results[1], torch.float64)


@device_param()
def test_inplace_refuses_torch_func(device):
    x = random_logits((4, 6), torch.float32, device)
    y = random_targets(6, (4,), device)
    with pytest.raises(RuntimeError, match="does not support torch.func"):
        torch.func.grad(lambda z: fce.cross_entropy(z * 1, y, inplace_backward=True))(x)


# ---------------------------------------------------------- in-place safety

@device_param()
def test_inplace_refuses_leaves_before_writing(device):
    leaf = random_logits((4, 6), torch.float32, device).requires_grad_()
    param = torch.nn.Parameter(random_logits((4, 6), torch.float32, device))
    y = random_targets(6, (4,), device)
    for tensor, what in [(leaf, "a leaf Variable"), (param, "a leaf Variable"), (param[:, :5], "a view of a leaf")]:
        before = tensor.detach().clone()
        target = y if tensor.shape[1] == 6 else y.clamp(max=4)
        with pytest.raises(RuntimeError, match=what):
            fce.cross_entropy(tensor, target, inplace_backward=True)
        assert torch.equal(tensor.detach(), before)


@device_param()
def test_inplace_refuses_internal_overlap(device):
    row = random_logits((1, 6), torch.float32, device).requires_grad_()
    y = random_targets(6, (4,), device)
    expanded = (row * 1).expand(4, 6)  # stride 0 over rows: one memory row for four
    before = expanded.detach().clone()
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        fce.cross_entropy(expanded, y, inplace_backward=True)
    assert torch.equal(expanded.detach(), before)


# ---------------------------------------------------------------- compile

@device_param()
@pytest.mark.parametrize("weighted", [False, True])
def test_compile_fullgraph_probability_targets(device, weighted):
    torch._dynamo.reset()
    weight = torch.rand(9, device=device) + 0.1 if weighted else None

    def loss_fn(x, t):
        return fce.cross_entropy(x, t, weight=weight, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True)
    x = random_logits((5, 9), torch.float32, device)
    compare_with_eager(loss_fn, compiled, x, random_probs((5, 9), torch.float32, device))


# ------------------------------------------------------------------ edges

@device_param()
def test_edge_parity(device):
    # C = 0 with probability targets: zeros per row.
    empty = torch.randn(3, 0, device=device)
    out = fce.cross_entropy(empty, torch.randn(3, 0, device=device), reduction="none")
    assert torch.equal(out, torch.zeros(3, device=device))
    # A mean over no weight is nan, with label smoothing too.
    x = random_logits((3, 4), torch.float32, device)
    y = torch.tensor([0, 0, -100], device=device)
    w = torch.tensor([0.0, 1.0, 1.0, 1.0], device=device)
    for kwargs in (dict(weight=w, label_smoothing=0.1), dict(label_smoothing=0.1)):
        target = y if "weight" in kwargs else torch.full_like(y, -100)
        assert torch.isnan(fce.cross_entropy(x, target, **kwargs))
        assert torch.isnan(F.cross_entropy(x, target, **kwargs))
    # A float64 weight with float32 logits and probability targets promotes.
    t = random_probs((3, 4), torch.float32, device)
    w64 = torch.rand(4, dtype=torch.float64, device=device)
    out, expected = fce.cross_entropy(x, t, weight=w64), F.cross_entropy(x, t, weight=w64)
    assert out.dtype == expected.dtype == torch.float64
    assert_close(out, expected, torch.float32)


# ---------------------------------------------------------------- layouts

@device_param()
@pytest.mark.parametrize("inplace", [False, True])
def test_transposed_logits_take_the_rows_path_without_copy(device, inplace, monkeypatch):
    btv = random_logits((2, 5, 11), torch.float32, device)  # (B, T, V)
    y = random_targets(11, (2, 5), device, ignore_index=-100)
    seen = []
    real = fce.functional.cross_entropy_rows if not inplace else fce.functional.inplace_cross_entropy
    name = "cross_entropy_rows" if not inplace else "inplace_cross_entropy"

    def spy(logits, *args):
        seen.append((logits.dim(), logits.untyped_storage().data_ptr()))
        return real(logits, *args)

    monkeypatch.setattr(fce.functional, name, spy)
    leaf = btv.clone().requires_grad_()
    x = leaf * 1
    logits = x.transpose(1, 2)  # (B, V, T), class stride 1
    out = fce.cross_entropy(logits, y, reduction="none", inplace_backward=inplace)
    assert seen == [(2, x.untyped_storage().data_ptr())]  # 2-D rows over the same memory
    ref_leaf = btv.clone().requires_grad_()
    expected = F.cross_entropy(ref_leaf.transpose(1, 2), y, reduction="none")
    assert_close(out, expected, torch.float32)
    grad = torch.rand_like(expected)
    out.backward(grad)
    expected.backward(grad)
    assert_close(leaf.grad, ref_leaf.grad, torch.float32)


# ----------------------------------------------------------- launch plan

def test_launch_plan_of_empty_rows_does_not_divide_by_zero():
    # (0, C) logits with C >= 16384 once crashed the CUDA host code (SIGFPE).
    for classes in (16384, 50257, 128256):
        fwd_splits, fwd_chunk, bwd_splits, _ = ops._launch_plan(0, classes, 1, False, 132)
        assert (fwd_splits, fwd_chunk) == (1, classes)
        assert bwd_splits >= 1


def test_launch_plan_covers_every_column():
    for rows, classes, sms in [(1, 128256, 132), (3, 50257, 132), (200, 50257, 132), (7, 16384, 78)]:
        splits, chunk, bwd_splits, bwd_chunk = ops._launch_plan(rows, classes, 1, False, sms)
        assert splits * chunk >= classes > (splits - 1) * chunk
        assert bwd_splits * bwd_chunk >= classes > (bwd_splits - 1) * bwd_chunk
        if rows >= 2 * sms:
            assert splits == 1


@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device: the CUDA kernels are compiled but cannot run here")
def test_cuda_empty_rows_with_many_classes():
    for classes in (16384, 50257):
        x = torch.randn(0, classes, device="cuda", requires_grad=True)
        y = torch.zeros(0, dtype=torch.long, device="cuda")
        out = fce.cross_entropy(x, y, reduction="sum")
        out.backward()
        assert out.item() == 0 and x.grad.shape == x.shape
