"""The policy entropy in CrossEntropyStats against a float64 composition: its
value, its gradient in the single backward pass, and where it is refused."""
import pytest
import torch

import fused_softmax_ce as fce
from conftest import assert_close, device_param, random_logits, random_target

ops = torch.ops.fused_softmax_ce

OPTIONS = {
    "plain": dict(),
    "temperature": dict(logit_scale=1 / 0.7),
    "softcap": dict(softcap=5.0),
    "all": dict(logit_scale=1.3, softcap=20.0, label_smoothing=0.1, z_loss_scale=1e-3),
}


def effective(x, logit_scale=1.0, softcap=None, **_):
    v = x.double() * logit_scale
    return softcap * torch.tanh(v / softcap) if softcap else v


def entropy_reference(x, valid, **options):
    """H = -sum p log p over dim 1 of the effective logits, 0 on ignored rows."""
    logp = effective(x, **options).log_softmax(1)
    terms = torch.where(logp > -torch.inf, logp.exp() * logp, 0.0)  # p log p -> 0 as p -> 0
    return torch.where(valid, -terms.sum(1), 0.0)


def problem(device, dtype, shape, target_kind):
    x = random_logits(shape, dtype, device)
    prob = target_kind == "prob"
    target = random_target(shape, dtype, device, prob, ignore_index=None if prob else -100, ignore_every=3)
    valid = torch.ones(shape[:1] + shape[2:], dtype=torch.bool, device=device) if prob else target != -100
    return x, target, valid


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(9, 37), (4, 300), (3, 11, 5), (2, 3001)], ids=str)
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_entropy_and_its_gradient_match_float64(device, dtype, options, shape, target_kind, reduction):
    options = OPTIONS[options]
    x, target, valid = problem(device, dtype, shape, target_kind)
    leaf = x.clone().requires_grad_()
    out = fce.cross_entropy(leaf, target, reduction=reduction, return_stats=True, **options)
    assert out.entropy.shape == out.lse.shape and out.entropy.dtype == out.lse.dtype

    x64 = x.double().requires_grad_()
    h_ref = entropy_reference(x64, valid, **options)
    ce = {k: v for k, v in options.items() if k == "label_smoothing"}
    loss_ref = torch.nn.functional.cross_entropy(effective(x64, **options), target.double() if target_kind == "prob"
                                                 else target, reduction=reduction, **ce)
    if options.get("z_loss_scale"):
        z = options["z_loss_scale"] * torch.where(valid, torch.logsumexp(effective(x64, **options), 1), 0.0) ** 2
        loss_ref = loss_ref + (z if reduction == "none" else z.sum() / valid.sum())
    assert_close(out.entropy, h_ref, dtype if dtype != torch.float64 else torch.float32)

    # An entropy bonus and the loss: both gradients in the one backward pass.
    c = torch.randn(h_ref.shape, dtype=torch.float64, device=device).float().double()  # exact in float32
    g = torch.rand(loss_ref.shape, dtype=torch.float64, device=device) + 0.5
    ((loss_ref * g).sum() + (h_ref * c).sum()).backward()
    ((out.loss * g.to(out.loss.dtype)).sum() + (out.entropy * c.to(out.entropy.dtype)).sum()).backward()
    assert_close(leaf.grad, x64.grad, dtype)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_alone_gets_its_gradient(device, dtype):
    # The loss is unused: the backward still runs, with only the entropy's term.
    x, target, valid = problem(device, dtype, (6, 129), "index")
    leaf = x.clone().requires_grad_()
    fce.cross_entropy(leaf, target, return_stats=True, softcap=8.0).entropy.sum().backward()
    x64 = x.double().requires_grad_()
    entropy_reference(x64, valid, softcap=8.0).sum().backward()
    assert_close(leaf.grad, x64.grad, dtype)
    assert leaf.grad[~valid].abs().sum() == 0  # ignored rows: no entropy, no gradient


@device_param()
def test_entropy_of_extreme_rows(device):
    # One-hot-like rows (entropy 0), uniform rows (log C) and -inf logits.
    x = random_logits((4, 200), torch.float32, device)
    x[0] = -1e4
    x[0, 5] = 50.0
    x[1] = 0.25
    x[2, ::3] = -torch.inf
    target = torch.tensor([5, 0, 1, 7], device=device)
    leaf = x.clone().requires_grad_()
    out = fce.cross_entropy(leaf, target, reduction="none", return_stats=True)
    h_ref = entropy_reference(x.double(), torch.ones(4, dtype=torch.bool, device=device))
    assert_close(out.entropy, h_ref, torch.float32)
    assert abs(out.entropy[0].item()) < 1e-30 and abs(out.entropy[1].item() - torch.log(torch.tensor(200.0)).item()) < 1e-5
    out.entropy.sum().backward()
    # The SIMD exp floors at 2**-126, so an -inf logit's gradient is a denormal, not 0.
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[2, ::3].abs() < 1e-30).all()


@device_param()
def test_inplace_refuses_the_entropy_gradient(device):
    x, target, _ = problem(device, torch.float32, (5, 17), "index")
    leaf = x.clone().requires_grad_()
    out = fce.cross_entropy(leaf * 1, target, return_stats=True, inplace_backward=True)
    assert_close(out.entropy, entropy_reference(x, target != -100), torch.float32)
    with pytest.raises(RuntimeError, match="entropy"):
        (out.loss + out.entropy.sum()).backward()


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_entropy_and_its_gradient(device, dtype, options, reduction):
    # The loss's gradients are made in the forward; the entropy's recomputes the chunks' logits.
    options = OPTIONS[options]
    h = random_logits((2, 5, 16), dtype, device, scale=1.0)
    w = random_logits((33, 16), dtype, device, scale=0.5)
    b = random_logits((33,), dtype, device, scale=0.5)
    target = torch.randint(0, 33, (2, 5), device=device)
    target[0, 1] = -100
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    out = fce.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], return_stats=True,
                                   reduction=reduction, chunk_size=3, **options)
    refs = [t.double().requires_grad_() for t in (h, w, b)]
    logits = (refs[0] @ refs[1].t() + refs[2]).reshape(-1, 33)
    h_ref = entropy_reference(logits, target.reshape(-1) != -100, **options).reshape(target.shape)
    assert out.entropy.shape == h_ref.shape and out.entropy.dtype == torch.float32
    tol = torch.float32 if dtype != torch.bfloat16 else dtype
    assert_close(out.entropy, h_ref, tol)
    ce = {k: v for k, v in options.items() if k == "label_smoothing"}
    loss_ref = torch.nn.functional.cross_entropy(effective(logits, **options), target.reshape(-1), **ce,
                                                 reduction=reduction)
    if options.get("z_loss_scale"):
        valid = target.reshape(-1) != -100
        z = options["z_loss_scale"] * torch.where(valid, torch.logsumexp(effective(logits, **options), 1), 0.0) ** 2
        loss_ref = loss_ref + (z if reduction == "none" else z.sum() / valid.sum())
    c = torch.randn(h_ref.shape, dtype=torch.float64, device=device).float().double()
    g = (torch.rand(loss_ref.shape, dtype=torch.float64, device=device) + 0.5).float().double()
    ((loss_ref * g).sum() - (h_ref * c).sum()).backward()
    ((out.loss * g.to(out.loss.dtype).reshape(out.loss.shape)).sum() - (out.entropy * c.float()).sum()).backward()
    for got, want in zip(leaves, refs):
        if dtype == torch.bfloat16:  # two gradients, each rounded to bf16 (half an ulp of the largest), then added
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1.6e-2, atol=2 ** -8 * want.grad.abs().max())
        else:
            assert_close(got.grad, want.grad, tol)


def test_linear_entropy_compiles_fullgraph():
    torch._dynamo.reset()

    def loss_fn(h, w, y):
        s = fce.linear_cross_entropy(h, w, y, return_stats=True, logit_scale=1.25, chunk_size=4)
        return s.loss - 0.1 * s.entropy.mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    h, w = torch.randn(9, 8), torch.randn(21, 8)
    y = torch.randint(0, 21, (9,))
    a = [t.clone().requires_grad_() for t in (h, w)]
    b = [t.clone().requires_grad_() for t in (h, w)]
    expected, got = loss_fn(*a, y), compiled(*b, y)
    expected.backward()
    got.backward()
    assert_close(got, expected, torch.float32)
    for x, z in zip(a, b):
        assert_close(z.grad, x.grad, torch.float32)


def test_plain_path_computes_no_entropy():
    x = torch.randn(4, 9)
    loss, lse, entropy, pred, target_pred = ops.ce_forward(x, torch.tensor([1, 2, 3, 4]), None, -100, 0.0)
    assert entropy.numel() == 0 and pred.numel() == 0


@device_param()
def test_compile_fullgraph_with_entropy(device):
    torch._dynamo.reset()

    def loss_fn(x, y):
        s = fce.cross_entropy(x, y, softcap=5.0, logit_scale=1.3, return_stats=True)
        return s.loss - 0.01 * s.entropy.mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x, y, _ = problem(device, torch.float32, (8, 40), "index")
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = loss_fn(a, y), compiled(b, y)
    expected.backward()
    got.backward()
    assert_close(got, expected, torch.float32)
    assert_close(b.grad, a.grad, torch.float32)


@device_param()
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_opcheck_backward_with_entropy(device, target_kind):
    x, target, _ = problem(device, torch.float32, (6, 11), target_kind)
    args = (-100, 0.1, 1.5, 4.0)
    torch.library.opcheck(ops.ce_forward, (x.clone().requires_grad_(), target, None) + args + (True,))
    loss, lse, entropy, _, _ = ops.ce_forward(x, target, None, *args, True)
    torch.library.opcheck(ops.ce_backward, (torch.rand_like(loss), None, x, target, None, lse) + args
                          + (torch.randn_like(entropy), entropy))


def test_forward_mode_and_vmap_entropy():
    x = torch.randn(5, 13, dtype=torch.float64)
    t = torch.randn_like(x)
    target = torch.randint(0, 13, (5,))
    valid = torch.ones(5, dtype=torch.bool)

    def h(z):
        return fce.cross_entropy(z, target, return_stats=True, softcap=4.0, reduction="none").entropy

    _, tangent = torch.func.jvp(h, (x,), (t,))
    _, expected = torch.func.jvp(lambda z: entropy_reference(z, valid, softcap=4.0), (x,), (t,))
    torch.testing.assert_close(tangent.double(), expected, atol=2e-6, rtol=2e-5)
    batched = torch.func.vmap(torch.func.grad(lambda z: h(z).sum()))(torch.stack([x, 2 * x]))
    for got, z in zip(batched, (x, 2 * x)):
        expected = torch.func.grad(lambda z: entropy_reference(z, valid, softcap=4.0).sum())(z)
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=2e-5)
