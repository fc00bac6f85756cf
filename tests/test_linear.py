"""linear_cross_entropy: parity with F.linear_cross_entropy and float64, chunking, autograd, compile, errors."""
import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from conftest import TOLERANCES, assert_close, device_param, random_logits, random_targets
from fused_softmax_ce._linear_op import linear_ce as _linear_ce

REDUCTIONS = ["mean", "sum", "none"]
# (ignore_index in the targets, label_smoothing, class weights, bias)
VARIANTS = [(False, 0.0, False, False), (True, 0.0, False, True), (False, 0.1, True, False),
            (True, 0.2, True, True)]


def make_case(n, h, v, dtype, device, ignore=False, smoothing=0.0, class_weights=False, bias=False,
              batch=None):
    """Fresh random input (N, H) (or batch + (H,)), weight (V, H), bias, targets and options."""
    shape = batch if batch is not None else (n,)
    x = random_logits(shape + (h,), dtype, device, scale=1.0).requires_grad_()
    w = random_logits((v, h), dtype, device, scale=h**-0.5 * 3).requires_grad_()
    b = random_logits((v,), dtype, device, scale=0.5).requires_grad_() if bias else None
    y = random_targets(v, shape, device, ignore_index=-100 if ignore else None, ignore_every=3)
    cw = (torch.rand(v, dtype=torch.float64, device=device) + 0.2).to(dtype) if class_weights else None
    return x, w, b, y, dict(weight=cw, label_smoothing=smoothing)


def leaves(x, w, b):
    return [t for t in (x, w, b) if t is not None and t.requires_grad]


def loss_and_grads(fn, x, w, b, y, grad_output_seed=0, **kwargs):
    """Loss and the gradients of the leaves for a random (never one) grad_output."""
    loss = fn(x, w, y, linear_bias=b, **kwargs)
    gen = torch.Generator(device=x.device).manual_seed(grad_output_seed)
    go = torch.rand(loss.shape, generator=gen, device=x.device, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, leaves(x, w, b), go.to(loss.dtype))
    return loss, grads


def as64(x, w, b):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b)]


def reference64(x, w, b, y, **kwargs):
    """F.linear_cross_entropy's reference path in float64 on the same (rounded) values."""
    kwargs = dict(kwargs)
    if kwargs.get("weight") is not None:
        kwargs["weight"] = kwargs["weight"].double()
    return loss_and_grads(F.linear_cross_entropy, *as64(x, w, b), y, **kwargs)


def check_against_float64(x, w, b, y, dtype, **kwargs):
    loss, grads = loss_and_grads(fce.linear_cross_entropy, x, w, b, y, **kwargs)
    ref_loss, ref_grads = reference64(x, w, b, y, **{k: v for k, v in kwargs.items() if k != "chunk_size"})
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, dtype)
    for g, r, t in zip(grads, ref_grads, leaves(x, w, b)):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, r, dtype)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore,smoothing,class_weights,bias", VARIANTS)
def test_parity_float64(device, dtype, reduction, ignore, smoothing, class_weights, bias):
    x, w, b, y, kw = make_case(13, 16, 37, dtype, device, ignore, smoothing, class_weights, bias)
    check_against_float64(x, w, b, y, dtype, reduction=reduction, chunk_size=4, **kw)


@device_param()
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore,smoothing,class_weights,bias", VARIANTS)
def test_parity_with_torch_reference_path(device, reduction, ignore, smoothing, class_weights, bias):
    x, w, b, y, kw = make_case(11, 8, 29, torch.float32, device, ignore, smoothing, class_weights, bias)
    loss, grads = loss_and_grads(fce.linear_cross_entropy, x, w, b, y, reduction=reduction, chunk_size=3, **kw)
    ref_loss, ref_grads = loss_and_grads(F.linear_cross_entropy, x, w, b, y, reduction=reduction,
                                         options=None, **kw)
    assert_close(loss, ref_loss, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32)


def rel_error(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@device_param()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_at_least_as_accurate_as_torch(device, dtype, reduction):
    """Against float64 on the same rounded values, no worse than PyTorch's own half path."""
    x, w, b, y, kw = make_case(24, 32, 61, dtype, device, True, 0.1, True, True)
    loss, grads = loss_and_grads(fce.linear_cross_entropy, x, w, b, y, reduction=reduction, chunk_size=5, **kw)
    t_loss, t_grads = loss_and_grads(F.linear_cross_entropy, x, w, b, y, reduction=reduction, **kw)
    ref_loss, ref_grads = reference64(x, w, b, y, reduction=reduction, **kw)
    assert all(g.dtype == dtype for g in grads) and loss.dtype == dtype
    assert_close(loss, ref_loss, dtype)
    # One rounding to the output dtype is the floor; allow half an ulp of slack over torch's error.
    slack = TOLERANCES[dtype][1] / 4
    assert rel_error(loss, ref_loss) <= rel_error(t_loss, ref_loss) + slack
    for g, t, r in zip(grads, t_grads, ref_grads):
        assert rel_error(g, r) <= rel_error(t, r) + slack


@device_param()
@pytest.mark.parametrize("n,h,v,chunk", [(1, 8, 3, None), (1, 8, 3, 7), (5, 4, 3, 1), (13, 8, 50, 7),
                                         (13, 8, 50, 1), (13, 8, 50, 100), (3, 4, 50257, None),
                                         (4, 4, 50257, 3)])
def test_odd_sizes_and_chunks(device, n, h, v, chunk):
    x, w, b, y, kw = make_case(n, h, v, torch.float64, device, False, 0.1, True, True)
    for reduction in REDUCTIONS:
        check_against_float64(x, w, b, y, torch.float64, reduction=reduction, chunk_size=chunk, **kw)


@device_param()
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batched_and_unbatched_inputs(device, reduction):
    """(B, T, H) input with (B, T) targets, and (H,) input with a scalar target, like linear then cross_entropy."""
    x, w, b, y, kw = make_case(0, 8, 19, torch.float64, device, True, 0.1, True, True, batch=(3, 5))
    loss, grads = loss_and_grads(fce.linear_cross_entropy, x, w, b, y, reduction=reduction, chunk_size=4, **kw)
    kw64 = dict(kw, weight=kw["weight"].double())
    x64, w64, b64 = as64(x, w, b)
    ref = F.cross_entropy(F.linear(x64, w64, b64).transpose(1, 2), y, reduction=reduction, **kw64)
    go = torch.rand_like(ref) + 0.5
    ref_grads = torch.autograd.grad(ref, (x64, w64, b64), go)
    grads = torch.autograd.grad(fce.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction, chunk_size=4,
                                                         **kw), (x, w, b), go)
    assert loss.shape == ref.shape
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float64)

    x1, y1 = x[0, 0].detach().requires_grad_(), y[0, 1]
    check_against_float64(x1, w, b, y1, torch.float64, reduction=reduction, **kw)


@device_param()
def test_tied_weights_accumulate_into_grad(device):
    """The embedding matrix reused as linear_weight gets both gradients in .grad."""
    v, h = 23, 8
    emb = random_logits((v, h), torch.float32, device, scale=0.5).requires_grad_()
    ids = random_targets(v, (3, 6), device)
    y = random_targets(v, (3, 6), device, ignore_index=-100)
    grads = []
    for fn in (fce.linear_cross_entropy, F.linear_cross_entropy):
        emb.grad = None
        hidden = torch.tanh(F.embedding(ids, emb) * 2)
        loss = fn(hidden.reshape(-1, h), emb, y.reshape(-1), label_smoothing=0.1)
        (loss * 3).backward()
        grads.append(emb.grad.clone())
        emb.grad += 0  # accumulating again (a second step) must add, not overwrite
    assert_close(grads[0], grads[1], torch.float32)
    emb.grad = grads[1].clone()
    hidden = torch.tanh(F.embedding(ids, emb) * 2)
    fce.linear_cross_entropy(hidden.reshape(-1, h), emb, y.reshape(-1), label_smoothing=0.1).mul(3).backward()
    assert_close(emb.grad, 2 * grads[1], torch.float32)


@device_param()
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("frozen", ["input", "weight", "both_but_bias"])
def test_some_inputs_do_not_require_grad(device, reduction, frozen):
    x, w, b, y, kw = make_case(9, 8, 21, torch.float64, device, True, 0.1, False, True)
    if frozen in ("input", "both_but_bias"):
        x = x.detach()
    if frozen in ("weight", "both_but_bias"):
        w = w.detach()
    check_against_float64(x, w, b, y, torch.float64, reduction=reduction, chunk_size=4, **kw)


@device_param()
def test_no_grad_gives_the_loss(device):
    x, w, b, y, kw = make_case(9, 8, 21, torch.float32, device, True, 0.1, True, True)
    with torch.no_grad():
        loss = fce.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=2, **kw)
    assert not loss.requires_grad
    assert_close(loss, reference64(x, w, b, y, **kw)[0], torch.float32)


@device_param()
def test_all_ignored_mean_is_nan_with_zero_gradients(device):
    x, w, b, y, kw = make_case(4, 8, 11, torch.float32, device)
    y = torch.full_like(y, -100)
    loss, grads = loss_and_grads(fce.linear_cross_entropy, x, w, b, y)
    ref_loss, ref_grads = loss_and_grads(F.linear_cross_entropy, x, w, b, y)
    assert loss.isnan() and ref_loss.isnan()
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@device_param()
def test_autocast_matches_torch(device):
    x, w, b, y, kw = make_case(12, 16, 33, torch.float32, device, True, 0.1, False, True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, grads = loss_and_grads(fce.linear_cross_entropy, x, w, b, y, chunk_size=5, **kw)
        ref_loss, ref_grads = loss_and_grads(F.linear_cross_entropy, x, w, b, y, **kw)
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert_close(loss, ref_loss, torch.bfloat16)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close(g, r, torch.bfloat16)


@device_param()
def test_half_weight_gradient_accumulation_dtype(device):
    """fp32 accumulation by default; grad_acc_dtype=bfloat16 sums in the weight's dtype, less accurately."""
    x, w, b, y, kw = make_case(64, 16, 40, torch.bfloat16, device, False, 0.0, False, True)
    ref = reference64(x, w, b, y, reduction="sum")[1]
    fp32 = loss_and_grads(fce.linear_cross_entropy, x, w, b, y, reduction="sum", chunk_size=2)[1]
    bf16 = loss_and_grads(fce.linear_cross_entropy, x, w, b, y, reduction="sum", chunk_size=2,
                          grad_acc_dtype=torch.bfloat16)[1]
    for a, c, r in zip(fp32[1:], bf16[1:], ref[1:]):
        assert a.dtype == c.dtype == torch.bfloat16
        assert rel_error(a, r) < rel_error(c, r) < 2e-2


@device_param()
def test_opcheck(device):
    x, w, b, y, kw = make_case(7, 8, 13, torch.float32, device, True, 0.1, True, True)
    plain = (1.0, 0.0, None, False)
    llm = (1.5, 5.0, torch.full((), 0.02, device=device), True)
    for reduction, bias, weight, options in [("mean", b, kw["weight"], plain), ("sum", None, None, llm),
                                             ("none", b, None, plain), ("mean", b, None, llm)]:
        needs = reduction != "none"
        scale = torch.full((), 0.25, device=device)
        torch.library.opcheck(_linear_ce, (x, w, y, bias, weight, scale, None, None, reduction, -100, 0.1, *options,
                                           3, torch.float32, needs, needs, needs and bias is not None))
    rows, token_weight = torch.rand(7, device=device), torch.randn(7, device=device)
    torch.library.opcheck(_linear_ce, (x.detach(), w.detach(), y, None, None, torch.ones((), device=device), rows,
                                       token_weight, "none", -100, 0.0, *llm, 2, torch.float32, True, True, False))


@device_param()
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [dict(z_loss_scale=1e-2), dict(softcap=3.0, logit_scale=1.5),
                                     dict(softcap=4.0, z_loss_scale=1e-2)],
                         ids=["zloss", "softcap-scale", "softcap-zloss"])
def test_llm_options_match_cross_entropy(device, reduction, options):
    x, w, b, y, kw = make_case(9, 6, 17, torch.float64, device, True, 0.1, True, True)
    refs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    stats = fce.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction, chunk_size=4,
                                     return_stats=True, **kw, **options)
    expected = fce.cross_entropy(refs[0] @ refs[1].T + refs[2], y, reduction=reduction, return_stats=True,
                                 **kw, **options)
    for got, want in zip(stats[:3], expected[:3]):
        assert_close(got, want, torch.float64)
    assert torch.equal(stats.accuracy, expected.accuracy)
    grad = torch.rand_like(expected.loss) + 0.5
    stats.loss.backward(grad)
    expected.loss.backward(grad)
    for got, want in zip((x, w, b), refs):
        assert_close(got.grad, want.grad, torch.float64)


@device_param()
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")  # by disabling the caches, on purpose
def test_compile_fullgraph(device, reduction):
    torch._dynamo.reset()

    def loss_fn(x, w, y, b):
        loss = fce.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                        chunk_size=4)
        return loss.sum() * 3 if reduction == "none" else loss * 3  # a grad_output that is not 1

    compiled = torch.compile(loss_fn, fullgraph=True)
    x, w, b, y, _ = make_case(10, 8, 27, torch.float32, device, True, 0.1, False, True)
    expected = loss_fn(x, w, y, b)
    exp_grads = torch.autograd.grad(expected, (x, w, b))
    # The on-disk graph caches would hide a change of the backward formula.
    with torch._inductor.config.patch(force_disable_caches=True):
        got = compiled(x, w, y, b)
    got_grads = torch.autograd.grad(got, (x, w, b))
    assert_close(got, expected, torch.float32)
    for g, e in zip(got_grads, exp_grads):
        assert_close(g, e, torch.float32)


@device_param()
def test_second_backward_and_double_backward_raise(device):
    x, w, b, y, kw = make_case(6, 8, 11, torch.float32, device)
    loss = fce.linear_cross_entropy(x, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fce.linear_cross_entropy(x, w, y), x, create_graph=True)
    # reduction='none' recomputes in its backward, so it may run twice.
    loss = fce.linear_cross_entropy(x, w, y, reduction="none").sum()
    first = torch.autograd.grad(loss, w, retain_graph=True)[0]
    assert_close(torch.autograd.grad(loss, w)[0], first, torch.float32)


def test_errors():
    x, w, b, y, kw = make_case(4, 8, 11, torch.float32, "cpu")
    with pytest.raises(NotImplementedError, match="probability targets"):
        fce.linear_cross_entropy(x, w, torch.rand(4, 11).softmax(1))
    with pytest.raises(NotImplementedError, match="K-dimensional"):
        fce.linear_cross_entropy(x, w.detach().reshape(11, 1, 8), y)
    with pytest.raises(RuntimeError, match="in_features"):
        fce.linear_cross_entropy(x, w.detach()[:, :5], y)
    with pytest.raises(RuntimeError, match="linear_bias shape"):
        fce.linear_cross_entropy(x, w, y, linear_bias=torch.zeros(10))
    with pytest.raises(ValueError, match="batch_size"):
        fce.linear_cross_entropy(x, w, y[:3])
    with pytest.raises(RuntimeError, match=r"expected scalar type Float but found Double \(weight\)"):
        fce.linear_cross_entropy(x, w, y, weight=torch.ones(11, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="linear_weight dtype"):
        fce.linear_cross_entropy(x, w.detach().double(), y)
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        fce.linear_cross_entropy(x, w, y, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows, got 0"):
        fce.linear_cross_entropy(x, w, y, chunk_size=0)
    with pytest.raises(RuntimeError, match="label_smoothing must be between"):
        fce.linear_cross_entropy(x, w, y, label_smoothing=1.5)
    with pytest.raises(IndexError, match="out of bounds"):
        fce.linear_cross_entropy(x, w, torch.full_like(y, 11))


@device_param()
def test_module(device):
    x, w, b, y, kw = make_case(8, 8, 15, torch.float32, device, True, 0.1, True, True)
    loss_fn = fce.LinearCrossEntropyLoss(weight=kw["weight"], ignore_index=-100, label_smoothing=0.1,
                                         reduction="sum", chunk_size=3)
    assert "weight" in loss_fn.state_dict()
    assert_close(loss_fn(x, w, y, b), reference64(x, w, b, y, reduction="sum", **kw)[0], torch.float32)
    assert "chunk_size=3" in repr(loss_fn)


def test_backward_allocates_nothing_weight_sized():
    """The gradients are made by the forward; the backward only scales them in place."""
    x, w, b, y, kw = make_case(16, 32, 400, torch.float32, "cpu", False, 0.0, False, True)
    loss = fce.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        grads = torch.autograd.grad(loss * 2, (x, w, b))
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert largest < w.numel() * w.element_size() // 4
    expected = torch.autograd.grad(F.linear_cross_entropy(x, w, y, linear_bias=b) * 2, (x, w, b))
    for g, e in zip(grads, expected):
        assert_close(g, e, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_statistics_are_not_differentiable(reduction):
    x, w, b, y, kw = make_case(5, 4, 7, torch.float32, "cpu")
    stats = fce.linear_cross_entropy(x, w, y, reduction=reduction, z_loss_scale=1e-2, return_stats=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        (stats.loss.sum() + stats.lse.sum()).backward()


def test_default_chunk_is_sized_by_bytes_with_a_floor():
    from fused_softmax_ce._chunks import CACHE_BYTES, MIN_CHUNK_ROWS, default_chunk_size

    # Tiny H, V / H >= N: the aspect-ratio rule gave one row per chunk (issue 20); now a cache-sized block.
    assert default_chunk_size(512, 4, 4096, 4) * 4096 * 4 == CACHE_BYTES
    assert default_chunk_size(512, 4, 4096, 4, "cuda") == 512
    # Rows = 8 H where that block is under CHUNK_BYTES, else CHUNK_BYTES; spread evenly over the chunks.
    for n, h, v, elem, rows in [(1 << 16, 1024, 32000, 4, 521),  # 64 MiB: 524 rows, 126 chunks
                                (10_000, 4096, 128256, 2, 257),  # 64 MiB: 261 rows, 39 chunks
                                (4099, 32, 50257, 4, 242),  # 8 H = 256 rows, 17 chunks
                                (1 << 16, 16, 50257, 4, 128)]:  # 8 H = 128 rows
        assert default_chunk_size(n, h, v, elem) == rows
    # Huge V: never under the floor of rows; never over N.
    assert default_chunk_size(4096, 8, 10**7, 4) == MIN_CHUNK_ROWS
    assert default_chunk_size(0, 8, 10, 4) == 1 and default_chunk_size(5, 8, 10, 4) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_and_wide_products_on_either_side_of_narrow_h(dtype):
    # H <= NARROW_H runs the gradient GEMMs transposed on the CPU (see Grads): both forms against float64.
    from fused_softmax_ce._chunks import NARROW_H

    for h in (NARROW_H, NARROW_H + 1):
        x, w, b, y, kw = make_case(21, h, 45, dtype, "cpu", True, 0.1, True, True)
        check_against_float64(x, w, b, y, dtype, reduction="sum", chunk_size=8, **kw)
