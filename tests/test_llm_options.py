"""The LLM options (logit_scale, softcap, z_loss_scale, return_stats) against a
plain-PyTorch float64 reference, in both modes, with every existing option."""
import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from conftest import (DTYPES, assert_close, compare_with_eager, device_param, random_logits, random_probs,
                      random_target, random_targets)

ops = torch.ops.fused_softmax_ce
REDUCTIONS = ["mean", "sum", "none"]

LLM = [
    dict(z_loss_scale=1e-3),
    dict(softcap=4.0),
    dict(logit_scale=0.7),
    dict(logit_scale=2.0, softcap=5.0, z_loss_scale=0.01),
]


def ids(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


def reference(logits, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
              logit_scale=1.0, softcap=None, z_loss_scale=0.0):
    """(loss, z_loss, lse, accuracy) in float64 from the definitions."""
    v = logits.double() * logit_scale
    if softcap:
        v = softcap * torch.tanh(v / softcap)
    prob = target.is_floating_point()
    t = target.double() if prob else target
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(v, t, weight=w, reduction=reduction, ignore_index=ignore_index,
                         label_smoothing=label_smoothing)
    valid = torch.ones(v.shape[:1] + v.shape[2:], dtype=torch.bool, device=v.device) if prob else target != ignore_index
    lse = torch.where(valid, torch.logsumexp(v, dim=1), 0.0)
    z_rows = z_loss_scale * lse**2
    if reduction == "none":
        z = z_rows
    elif reduction == "sum":
        z = z_rows.sum()
    else:
        z = z_rows.sum() / valid.sum()
    pred = v.argmax(1)
    label = target.argmax(1) if prob else target
    accuracy = ((pred == label) & valid).sum().double() / valid.sum()
    return ce + z, z, lse, accuracy


def problem(device, dtype, shape, prob, weighted, ignore):
    c = shape[1]
    logits = random_logits(shape, dtype, device)
    target = random_target(shape, dtype, device, prob, ignore_index=-100 if ignore else None, ignore_every=3)
    if not prob:
        # Some rows whose target is the argmax, so that accuracy is neither 0 nor 1.
        target.view(-1)[1::4] = logits.argmax(1).reshape(-1)[1::4]
    weight = (torch.rand(c, dtype=torch.float64, device=device) + 0.1).to(dtype) if weighted else None
    return logits, target, weight


@device_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", LLM, ids=ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["index", "index-weighted-smooth-ignore", "prob-weighted-smooth", "kdim"])
@pytest.mark.parametrize("inplace", [False, True])
def test_options_match_reference(device, dtype, options, reduction, case, inplace):
    shape = (4, 9, 3) if case == "kdim" else (7, 37)
    prob = case.startswith("prob")
    logits, target, weight = problem(device, dtype, shape, prob, "weighted" in case, "ignore" in case)
    kwargs = dict(reduction=reduction, label_smoothing=0.1 if "smooth" in case else 0.0, **options)
    x_ref = logits.detach().double().requires_grad_()
    loss_ref, z_ref, lse_ref, acc_ref = reference(x_ref, target, weight, **kwargs)

    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    out = fce.cross_entropy(x, target, weight=weight, inplace_backward=inplace, return_stats=True, **kwargs)
    assert isinstance(out, fce.CrossEntropyStats)
    assert_close(out.loss, loss_ref, dtype)
    assert_close(out.z_loss, z_ref, dtype)
    assert out.lse.dtype == torch.float32 and out.lse.shape == lse_ref.shape
    assert_close(out.lse, lse_ref, dtype if dtype != torch.float64 else torch.float32)
    assert out.accuracy.dtype == torch.float32 and not out.accuracy.requires_grad
    torch.testing.assert_close(out.accuracy.double(), acc_ref, atol=1e-6, rtol=0)

    grad = torch.rand_like(loss_ref) + 0.5
    loss_ref.backward(grad)
    out.loss.backward(grad.to(out.loss.dtype))
    assert_close(leaf.grad, x_ref.grad, dtype)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [30.0, 43.0, 60.0])  # the CPU's fixed shift holds up to 43
@pytest.mark.parametrize("inplace", [False, True])
def test_softcap_saturated_rows(device, dtype, softcap, inplace):
    # Long rows (4-vector chunks, single vectors and a tail), most values
    # saturated: a row far below -cap everywhere, one with infinities, one
    # with a single class near +cap.
    logits = random_logits((5, 301), dtype, device, scale=4 * softcap)
    logits[1] = -1000.0
    logits[2, ::7] = float("inf")
    logits[2, 3::7] = -float("inf")
    logits[3] = random_logits((301,), dtype, device, scale=1.0) - 3 * softcap
    logits[3, 150] = 3 * softcap
    target = torch.tensor([0, 17, 3, 150, 300], device=device)
    x_ref = logits.detach().double().requires_grad_()
    loss_ref, _, lse_ref, _ = reference(x_ref, target, reduction="none", softcap=softcap)
    leaf = logits.detach().clone().requires_grad_()
    out = fce.cross_entropy(leaf * 1 if inplace else leaf, target, reduction="none", softcap=softcap,
                            inplace_backward=inplace, return_stats=True)
    assert_close(out.loss, loss_ref, dtype)
    assert_close(out.lse, lse_ref, dtype)
    grad = torch.rand_like(loss_ref) + 0.5
    loss_ref.backward(grad)
    out.loss.backward(grad.to(out.loss.dtype))
    assert_close(leaf.grad, x_ref.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [30.0, 60.0])
@pytest.mark.parametrize("case", ["index-stats", "prob-weighted-smooth"])
@pytest.mark.parametrize("inplace", [False, True])
def test_softcap_table_gives_the_bits_of_row_by_row(dtype, softcap, case, inplace):
    # On the CPU a launch of at least 2**18 16-bit logits looks the softcap's
    # tanh up in a table of all 65536 bit patterns; one row alone is below
    # that size. Both must give the same bits, and match the reference.
    prob = case.startswith("prob")
    logits, target, weight = problem("cpu", dtype, (9, 30001), prob, "weighted" in case, False)
    kwargs = dict(weight=weight, reduction="none", softcap=softcap, return_stats=True,
                  label_smoothing=0.1 if "smooth" in case else 0.0)
    grad = torch.rand(9, dtype=torch.float32) + 0.5

    def run(rows):
        leaf = logits[rows].detach().clone().requires_grad_()
        out = fce.cross_entropy(leaf * 1 if inplace else leaf, target[rows], inplace_backward=inplace, **kwargs)
        out.loss.backward(grad[rows])
        return out, leaf.grad

    whole, whole_grad = run(slice(None))
    hits = 0.0
    for r in range(9):
        row, row_grad = run(slice(r, r + 1))
        assert torch.equal(row.loss, whole.loss[r:r + 1]) and torch.equal(row.lse, whole.lse[r:r + 1])
        assert torch.equal(row_grad, whole_grad[r:r + 1])
        hits += row.accuracy.item()
    assert hits / 9 == pytest.approx(whole.accuracy.item())
    x_ref = logits.detach().double().requires_grad_()
    loss_ref, _, lse_ref, acc_ref = reference(x_ref, target, **{k: v for k, v in kwargs.items() if k != "return_stats"})
    assert_close(whole.loss, loss_ref, dtype)
    assert_close(whole.lse, lse_ref, dtype)
    torch.testing.assert_close(whole.accuracy.double(), acc_ref, atol=1e-6, rtol=0)
    loss_ref.backward(grad.double())
    assert_close(whole_grad, x_ref.grad, dtype)


@device_param()
@pytest.mark.parametrize("options", LLM, ids=ids)
@pytest.mark.parametrize("prob", [False, True])
def test_plain_loss_without_stats_matches_reference(device, options, prob):
    logits, target, weight = problem(device, torch.float32, (6, 21), prob, True, not prob)
    out = fce.cross_entropy(logits, target, weight=weight, **options)
    assert torch.is_tensor(out)
    assert_close(out, reference(logits, target, weight, **options)[0], torch.float32)


@device_param()
@pytest.mark.parametrize("options", LLM, ids=ids)
def test_gradient_through_lse(device, options):
    logits, target, weight = problem(device, torch.float64, (5, 11), False, True, True)
    x = logits.clone().requires_grad_()
    x_ref = logits.clone().requires_grad_()
    stats = fce.cross_entropy(x, target, weight=weight, return_stats=True, **options)
    loss_ref, _, lse_ref, _ = reference(x_ref, target, weight, **options)
    # A user's own lse penalty on top of the loss.
    (stats.loss + (stats.lse.double() ** 3).sum()).backward()
    (loss_ref + (lse_ref**3).sum()).backward()
    assert_close(x.grad, x_ref.grad, torch.float32)  # stats.lse is float32


@device_param()
@pytest.mark.parametrize("options", LLM, ids=ids)
@pytest.mark.parametrize("prob", [False, True])
def test_gradcheck_with_options(device, options, prob):
    logits, target, weight = problem(device, torch.float64, (3, 5), prob, True, False)
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: fce.cross_entropy(z, target, weight=weight, reduction="none", label_smoothing=0.1, **options),
        (x,))


@device_param()
def test_inplace_stats_are_not_differentiable(device):
    logits, target, _ = problem(device, torch.float32, (4, 9), False, False, False)
    x = logits.clone().requires_grad_()
    stats = fce.cross_entropy(x * 1, target, z_loss_scale=0.1, inplace_backward=True, return_stats=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        (stats.loss + stats.lse.sum()).backward()


@device_param()
def test_ignored_rows_have_no_prediction_or_lse(device):
    logits = random_logits((4, 6), torch.float32, device)
    target = torch.tensor([1, -100, 2, -100], device=device)
    loss, lse, _, pred, target_pred = ops.ce_forward(logits, target, None, -100, 0.0, 1.0, 0.0, True)
    assert pred.tolist()[1::2] == [-1, -1] and lse.tolist()[1::2] == [0.0, 0.0]
    assert pred.tolist()[0::2] == logits.argmax(1).tolist()[0::2]
    assert target_pred.numel() == 0


@device_param()
def test_argmax_ties_take_the_first_index(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0] * 4, [-float("inf")] * 3 + [5.0]], device=device)
    target = torch.tensor([2, 0, 3], device=device)
    stats = fce.cross_entropy(logits, target, return_stats=True)
    assert stats.accuracy.item() == pytest.approx(2 / 3)  # row 0's argmax is 1, as torch.argmax


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_argmax_ties_in_long_rows(device, dtype, softcap):
    # Ties in other lanes, chunks and vectors of the SIMD pass, before and after the first one.
    logits = random_logits((6, 300), dtype, device)
    ties = [(7, 100), (70, 3), (64, 65), (0, 299), (150, 151, 16), (255, 256)]
    for row, positions in enumerate(ties):
        for pos in positions:
            logits[row, pos] = 50.0
    _, _, _, pred, _ = ops.ce_forward(logits, torch.zeros(6, dtype=torch.long, device=device), None, -100, 0.0,
                                   1.0, softcap or 0.0, True)
    assert pred.tolist() == [min(p) for p in ties]


@device_param()
@pytest.mark.parametrize("c", [5, 40, 77])  # scalar tail only, and the vector path
def test_argmax_takes_the_first_nan_as_torch(device, c):
    logits = random_logits((3, c), torch.float32, device)
    logits[0, c // 2] = float("nan")
    logits[0, c - 1] = float("nan")
    logits[1, 1] = float("nan")
    _, _, _, pred, _ = ops.ce_forward(logits, torch.zeros(3, dtype=torch.long, device=device), None, -100, 0.0,
                                   1.0, 0.0, True)
    assert pred.tolist() == logits.argmax(1).tolist()


@device_param()
def test_defaults_are_bit_for_bit_unchanged(device):
    logits, target, weight = problem(device, torch.float32, (9, 33), False, True, True)
    plain = fce.cross_entropy(logits, target, weight=weight, label_smoothing=0.1, reduction="none")
    explicit = fce.cross_entropy(logits, target, weight=weight, label_smoothing=0.1, reduction="none",
                                 logit_scale=1.0, softcap=None, z_loss_scale=0.0)
    assert torch.equal(plain, explicit)


@pytest.mark.parametrize("kwargs, match", [
    (dict(logit_scale=0.0), "logit_scale"),
    (dict(logit_scale=float("inf")), "logit_scale"),
    (dict(logit_scale=-1.0), "logit_scale"),
    (dict(softcap=0.0), "softcap"),
    (dict(softcap=float("nan")), "softcap"),
    (dict(z_loss_scale=-0.1), "z_loss_scale"),
    (dict(z_loss_scale=True), "z_loss_scale"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), **kwargs)


def test_second_order_with_transform_raises_clearly():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = fce.cross_entropy(x, torch.tensor([0, 1, 2]), softcap=3.0)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order derivatives"):
        g.sum().backward()


@device_param()
def test_opcheck_with_options(device):
    x = random_logits((6, 11), torch.float32, device)
    y = random_targets(11, (6,), device, ignore_index=-100)
    probs = random_probs((6, 11), torch.float32, device)
    w = torch.rand(11, device=device) + 0.1
    for target in (y, probs):
        args = (target, w, -100, 0.1, 1.5, 4.0)
        torch.library.opcheck(ops.ce_forward, (x.clone().requires_grad_(),) + args + (True,))
        loss, lse, _, _, _ = ops.ce_forward(x, *args)
        torch.library.opcheck(ops.ce_backward, (torch.rand_like(loss), torch.rand_like(lse), x, target, w, lse,
                                                -100, 0.1, 1.5, 4.0))
        torch.library.opcheck(ops.ce_forward_inplace, (x.clone(), target, w, torch.ones((), device=device),
                                                       -100, 0.1, 1.5, 4.0, torch.full((), 0.2, device=device), True))


@device_param()
def test_compile_fullgraph_with_options(device):
    torch._dynamo.reset()

    def loss_fn(x, y):
        s = fce.cross_entropy(x, y, softcap=5.0, logit_scale=1.3, z_loss_scale=1e-2, return_stats=True)
        return s.loss, s.accuracy

    compiled = torch.compile(loss_fn, fullgraph=True)
    x = random_logits((8, 33), torch.float32, device)
    y = random_targets(33, (8,), device, ignore_index=-100)
    (_, acc_e), (_, acc_c) = compare_with_eager(loss_fn, compiled, x, y)
    assert torch.equal(acc_c, acc_e)


def test_module_passes_options():
    loss_fn = fce.CrossEntropyLoss(label_smoothing=0.1, softcap=3.0, z_loss_scale=1e-3, logit_scale=0.5)
    x = torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    expected = fce.cross_entropy(x, y, label_smoothing=0.1, softcap=3.0, z_loss_scale=1e-3, logit_scale=0.5)
    assert torch.equal(loss_fn(x, y), expected)
    assert "softcap=3.0" in repr(loss_fn)
