"""generalized_jsd and linear_generalized_jsd (CPU) against TRL's formula in float64."""
import itertools

import pytest
import torch

from fused_softmax_ce import generalized_jsd, linear_generalized_jsd
from fused_softmax_ce._jsd_ops import ops
from jsd_reference import reference, trl_jsd

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# (atol, rtol) of the loss (computed in float32 from the rounded logits) and
# of the gradient (rounded to the logits' dtype). float32 gradients are also
# held to TORCH_FP32_FACTOR x the error of PyTorch's own float32 composition
# (check): the mixture and reverse-KL gradients p (s - t - X) cancel, and
# both lose those digits; the CPU's exp polynomial (2e-7 relative, against
# Sleef's 1 ulp) makes the row sum X, and so these gradients, 2 to 5 times
# less exact than PyTorch's at V = 50257 with logits of scale 5.
LOSS_TOL = {torch.float32: (2e-6, 2e-5), torch.bfloat16: (2e-6, 2e-5), torch.float64: (1e-12, 1e-10)}
GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1e-2), torch.float64: (1e-15, 1e-10)}
TORCH_FP32_FACTOR = 8
BETAS = [0.0, 0.1, 0.5, 1.0]


def logits(shape, dtype, scale=3.0, seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return (torch.randn(shape, dtype=torch.float64, generator=g) * scale).to(dtype)


def labels_for(lead, ignore_index=-100, every=3):
    y = torch.randint(0, 50, lead)
    y.view(-1)[::every] = ignore_index
    return y


def close(got, want, tol):
    atol, rtol = tol
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def check(student, teacher, labels, tol_dtype, **kw):
    s = student.clone().requires_grad_()
    loss = generalized_jsd(s, teacher, labels, **kw)
    s_ref = student.clone().requires_grad_()
    want = reference(s_ref, teacher, labels, **kw)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    close(loss, want, LOSS_TOL[tol_dtype])
    upstream = torch.rand_like(want) + 0.5  # a per-row grad_output for 'none'
    (loss * upstream.to(loss.dtype)).sum().backward()
    (want * upstream).sum().backward()
    assert s.grad.dtype == student.dtype
    close(s.grad, s_ref.grad, GRAD_TOL[tol_dtype])
    if student.dtype == torch.float32:
        s32 = student.clone().requires_grad_()
        (trl_jsd(s32, teacher, labels, **kw) * upstream.float()).sum().backward()
        torch_err = (s32.grad.double() - s_ref.grad).abs().max()
        assert (s.grad.double() - s_ref.grad).abs().max() <= TORCH_FP32_FACTOR * torch_err + 1e-7
    return loss, s.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 50), (3, 5, 50)], ids=["2d", "3d"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_reference(dtype, shape, beta, temperature, with_labels, reduction):
    student, teacher = logits(shape, dtype), logits(shape, dtype, scale=2.0)
    labels = labels_for(shape[:-1], ignore_index=7) if with_labels else None
    check(student, teacher, labels, dtype, beta=beta, temperature=temperature, ignore_index=7, reduction=reduction)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("classes", [1, 7, 8, 9, 1000, 50257])
def test_vocab_sizes(beta, classes):
    """The SIMD log-sums' tails (V not a multiple of 8) and a large vocabulary."""
    student, teacher = logits((3, classes), torch.float32, 5.0), logits((3, classes), torch.float32, 5.0)
    check(student, teacher, None, torch.float32, beta=beta)


@pytest.mark.parametrize("beta", BETAS)
def test_large_offsets(beta):
    """Logits around 1e4: the row statistics keep max and log-sum apart."""
    student = logits((8, 300), torch.float32) + 1e4
    teacher = logits((8, 300), torch.float32) - 2e4
    check(student, teacher, None, torch.float32, beta=beta)


def test_ignored_rows_get_zero():
    student, teacher = logits((6, 40), torch.float32), logits((6, 40), torch.float32)
    labels = torch.tensor([1, -100, 3, -100, -100, 2])
    s = student.clone().requires_grad_()
    rows = generalized_jsd(s, teacher, labels, reduction="none")
    assert (rows[labels == -100] == 0).all() and (rows[labels != -100] > 0).all()
    rows.sum().backward()
    assert (s.grad[labels == -100] == 0).all() and (s.grad[labels != -100] != 0).any()


def test_all_ignored_batchmean_is_nan_as_trl():
    """TRL divides the (empty) sum by the number of kept rows: 0 / 0."""
    student, teacher = logits((4, 10), torch.float32), logits((4, 10), torch.float32)
    labels = torch.full((4,), -100)
    s = student.clone().requires_grad_()
    loss = generalized_jsd(s, teacher, labels)
    assert loss.isnan()
    assert reference(student, teacher, labels).isnan()
    loss.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_teacher_logits_count_as_zero(dtype):
    """-inf teacher logits (masked tokens) add 0 where TRL's formula gives
    nan (0 * -inf): with one finite teacher logit, beta = 0 is -s at it."""
    student = logits((4, 40), dtype)
    teacher = torch.full((4, 40), float("-inf"), dtype=dtype)
    teacher[:, 5] = 0.0
    s = student.clone().requires_grad_()
    rows = generalized_jsd(s, teacher, beta=0.0, reduction="none")
    want = -torch.log_softmax(student.double(), -1)[:, 5]
    close(rows, want, LOSS_TOL[dtype])
    rows.sum().backward()
    onehot = torch.zeros_like(student.double())
    onehot[:, 5] = 1
    close(s.grad, torch.softmax(student.double(), -1) - onehot, GRAD_TOL[dtype])
    assert reference(student, teacher, beta=0.0, reduction="none").isnan().all()


def test_batchmean_without_labels_divides_by_rows():
    student, teacher = logits((2, 3, 20), torch.float64), logits((2, 3, 20), torch.float64)
    total = generalized_jsd(student, teacher, reduction="sum")
    torch.testing.assert_close(generalized_jsd(student, teacher), total / 6)


def test_identical_distributions_give_zero():
    x = logits((5, 30), torch.float64)
    for beta in BETAS:
        assert generalized_jsd(x, x + 3.0, beta=beta).abs() < 1e-12  # a shift leaves the softmax


def test_strided_and_mixed_dtype_inputs():
    wide = logits((9, 80), torch.float32)
    student, teacher = wide[:, 5:55], logits((9, 50), torch.float64)[:, :].t().contiguous().t()
    loss = generalized_jsd(student, teacher)
    assert loss.dtype == torch.float64  # promoted, as PyTorch's arithmetic
    close(loss, reference(student, teacher), LOSS_TOL[torch.float64])


def test_poisoned_inplace_backward_overwrites_every_element():
    """jsd_backward_ writes each element: a nan left in the student would show."""
    student, teacher = logits((5, 33), torch.float32), logits((5, 33), torch.float32)
    labels = torch.tensor([0, -100, 1, 2, -100])
    loss, stats = ops.jsd_forward(student, teacher, labels, 0.3, 1.5, -100)
    grad = ops.jsd_backward(torch.ones(5), student, teacher, labels, stats, 0.3, 1.5, -100)
    inplace = student.clone()
    ops.jsd_backward_(inplace, torch.ones(5), teacher, labels, stats, 0.3, 1.5, -100)
    torch.testing.assert_close(inplace, grad, atol=0, rtol=0)
    assert grad.isfinite().all()


def test_teacher_requiring_grad_raises():
    student = logits((4, 10), torch.float32).requires_grad_()
    teacher = logits((4, 10), torch.float32).requires_grad_()
    with pytest.raises(ValueError, match="teacher.*requires grad"):
        generalized_jsd(student, teacher)
    generalized_jsd(student, teacher.detach())  # the documented way out


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(beta=1.5), ValueError, r"beta must be in \[0, 1\], got 1.5"),
    (dict(beta=-0.1), ValueError, "beta must be in"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0, got 0.0"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(reduction="mean"), ValueError, "reduction must be one of .* got 'mean'"),
])
def test_option_errors(kwargs, exc, match):
    x = logits((2, 5), torch.float32)
    with pytest.raises(exc, match=match):
        generalized_jsd(x, x, **kwargs)


def test_shape_and_label_errors():
    x = logits((2, 5), torch.float32)
    with pytest.raises(ValueError, match=r"teacher_logits must have the student's shape \(2, 5\), got \(2, 6\)"):
        generalized_jsd(x, logits((2, 6), torch.float32))
    with pytest.raises(ValueError, match=r"\(N, V\) or \(B, T, V\), got shape \(10,\)"):
        generalized_jsd(x.reshape(-1), x.reshape(-1))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\).*got \(3,\)"):
        generalized_jsd(x, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="labels must be integer class indices, got torch.float32"):
        generalized_jsd(x, x, torch.zeros(2))
    with pytest.raises(RuntimeError, match="student_logits must be float32.*got torch.int64"):
        generalized_jsd(x.long(), x)


def test_double_backward_refused():
    s = logits((3, 8), torch.float64).requires_grad_()
    (g,) = torch.autograd.grad(generalized_jsd(s, logits((3, 8), torch.float64)), s, create_graph=False)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(generalized_jsd(s, logits((3, 8), torch.float64)), s, create_graph=True)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_opcheck(beta):
    student, teacher = logits((6, 20), torch.float32), logits((6, 20), torch.float32)
    labels = torch.tensor([0, -100, 1, 2, 3, -100])
    args = (beta, 2.0, -100)
    torch.library.opcheck(ops.jsd_forward, (student.requires_grad_(), teacher, labels, *args))
    _, stats = ops.jsd_forward(student.detach(), teacher, labels, *args)
    torch.library.opcheck(ops.jsd_backward, (torch.rand(6), student.detach(), teacher, labels, stats, *args))
    torch.library.opcheck(ops.jsd_backward_, (student.detach().clone(), torch.ones(()), teacher, None, stats,
                                              *args))


def test_compiled_fullgraph_matches_eager():
    student, teacher = logits((2, 7, 64), torch.float32), logits((2, 7, 64), torch.float32)
    labels = labels_for((2, 7))
    f = torch.compile(generalized_jsd, fullgraph=True, backend="aot_eager")
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    out = f(s1, teacher, labels, beta=0.3, temperature=2.0)
    want = generalized_jsd(s2, teacher, labels, beta=0.3, temperature=2.0)
    torch.testing.assert_close(out, want)
    out.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


# ----------------------------------------------------------- linear form

def linear_case(shape, hs, ht, v, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(dtype)

    xs, xt = rand(*shape, hs), rand(*shape, ht)
    ws, wt = rand(v, hs, scale=hs ** -0.5 * 2), rand(v, ht, scale=ht ** -0.5 * 2)
    bs, bt = (rand(v), rand(v)) if bias else (None, None)
    return xs, ws, bs, xt, wt, bt


def linear_reference(xs, ws, bs, xt, wt, bt, labels, **kw):
    zs = torch.nn.functional.linear(xs.double(), ws.double(), None if bs is None else bs.double())
    zt = torch.nn.functional.linear(xt.double(), wt.double(), None if bt is None else bt.double())
    return reference(zs, zt, labels, **kw)


LINEAR_COMBOS = list(itertools.product(DTYPES, [(13,), (2, 5)], [0.0, 0.4, 1.0], [False, True],
                                       ["batchmean", "sum", "none"]))


@pytest.mark.parametrize("dtype, shape, beta, with_labels, reduction", LINEAR_COMBOS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(dtype, shape, beta, with_labels, reduction, bias):
    xs, ws, bs, xt, wt, bt = linear_case(shape, 16, 24, 40, dtype, bias)
    labels = labels_for(shape, every=4) if with_labels else None
    kw = dict(beta=beta, temperature=1.7, reduction=reduction)
    params = [p.clone().requires_grad_() for p in (xs, ws) + ((bs,) if bias else ())]
    refs = [p.detach().double().requires_grad_() for p in params]
    loss = linear_generalized_jsd(params[0], params[1], xt, wt, labels, student_bias=params[2] if bias else None,
                                  teacher_bias=bt, chunk_size=4, **kw)
    want = linear_reference(refs[0], refs[1], refs[2] if bias else None, xt, wt, bt, labels, **kw)
    # bf16 inputs round the logits on the reference's side too; the kernel sees float32 matmuls of them on the CPU.
    tol = {torch.bfloat16: (1e-5, 1e-4)}.get(dtype, LOSS_TOL[dtype])
    close(loss, want, tol)
    upstream = torch.rand_like(want) + 0.5
    (loss * upstream.to(loss.dtype)).sum().backward()
    (want * upstream).sum().backward()
    for p, r in zip(params, refs):
        assert p.grad.dtype == p.dtype
        close(p.grad, r.grad, {torch.bfloat16: (1e-3, 2e-2)}.get(dtype, GRAD_TOL[dtype]))


@pytest.mark.parametrize("chunk_size", [1, 3, 64, None])
def test_linear_chunk_sizes_agree(chunk_size):
    xs, ws, bs, xt, wt, bt = linear_case((11,), 8, 12, 30, torch.float64, True)
    labels = labels_for((11,))
    s = xs.clone().requires_grad_()
    loss = linear_generalized_jsd(s, ws, xt, wt, labels, student_bias=bs, teacher_bias=bt, chunk_size=chunk_size)
    want = linear_reference(xs, ws, bs, xt, wt, bt, labels)
    close(loss, want, LOSS_TOL[torch.float64])
    loss.backward()
    assert s.grad.isfinite().all()


def test_linear_teacher_gets_no_gradient_and_refuses_one():
    xs, ws, bs, xt, wt, bt = linear_case((6,), 8, 8, 20, torch.float32, True)
    with pytest.raises(ValueError, match="teacher.*requires grad"):
        linear_generalized_jsd(xs, ws, xt, wt.clone().requires_grad_())
    with pytest.raises(ValueError, match="teacher.*requires grad"):
        linear_generalized_jsd(xs, ws, xt.clone().requires_grad_(), wt)
    w = ws.clone().requires_grad_()
    linear_generalized_jsd(xs, w, xt, wt).backward()
    assert w.grad is not None


def test_linear_errors():
    xs, ws, bs, xt, wt, bt = linear_case((6,), 8, 12, 20, torch.float32, True)
    with pytest.raises(ValueError, match="vocabularies must match.*20 rows.*21"):
        linear_generalized_jsd(xs, ws, xt, torch.randn(21, 12))
    with pytest.raises(RuntimeError, match="teacher_input's hidden size 12 does not match teacher_weight"):
        linear_generalized_jsd(xs, ws, xt, torch.randn(20, 8))
    with pytest.raises(ValueError, match="same leading"):
        linear_generalized_jsd(xs, ws, xt[:5], wt)
    with pytest.raises(RuntimeError, match=r"student_bias must have shape \(20,\)"):
        linear_generalized_jsd(xs, ws, xt, wt, student_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        linear_generalized_jsd(xs, ws, xt, wt, chunk_size=0)


def test_linear_all_ignored_batchmean():
    xs, ws, _, xt, wt, _ = linear_case((5,), 8, 8, 20, torch.float32, False)
    s = xs.clone().requires_grad_()
    loss = linear_generalized_jsd(s, ws, xt, wt, torch.full((5,), -100))
    assert loss.isnan()
    loss.backward()
    assert (s.grad == 0).all()


def test_linear_autocast_matches_reference():
    xs, ws, bs, xt, wt, bt = linear_case((2, 6), 16, 8, 32, torch.float32, True)
    labels = labels_for((2, 6))
    w = ws.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_generalized_jsd(xs, w, xt, wt, labels, student_bias=bs, teacher_bias=bt)
    assert loss.dtype == torch.float32
    r = [t.to(torch.bfloat16) for t in (xs, ws, bs, xt, wt, bt)]
    w_ref = r[1].double().requires_grad_()
    want = linear_reference(r[0], w_ref, r[2], r[3], r[4], r[5], labels)
    close(loss, want, (1e-5, 1e-4))
    loss.backward()
    want.backward()
    assert w.grad.dtype == torch.float32
    close(w.grad, w_ref.grad, (1e-3, 2e-2))


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_linear_compiled_fullgraph(reduction):
    xs, ws, bs, xt, wt, bt = linear_case((3, 4), 8, 16, 24, torch.float32, True)
    labels = labels_for((3, 4))

    def step(x, w, b):
        out = linear_generalized_jsd(x, w, xt, wt, labels, student_bias=b, teacher_bias=bt, beta=0.2,
                                     reduction=reduction, chunk_size=5)
        return out.sum() * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (xs, ws, bs)]
    b = [t.clone().requires_grad_() for t in (xs, ws, bs)]
    out, want = compiled(*a), step(*b)
    torch.testing.assert_close(out, want)
    out.backward()
    want.backward()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_linear_opcheck():
    xs, ws, bs, xt, wt, bt = linear_case((7,), 8, 6, 16, torch.float32, True)
    from fused_softmax_ce._linear_jsd_op import linear_jsd
    args = (xs, ws.requires_grad_(), xt, wt, labels_for((7,)), bs, bt, torch.tensor(0.25), None, "sum", 0.5, 1.0,
            -100, 3, torch.float32, False, True, False)
    torch.library.opcheck(linear_jsd, args)
