"""The generalized JSD on CUDA (skipped without a GPU): against TRL's formula
in float64, over poisoned memory, the linear form, torch.compile."""
import pytest
import torch

from conftest import CUDA_SKIP_REASON
from fused_softmax_ce import generalized_jsd, linear_generalized_jsd
from jsd_reference import reference
from test_jsd import GRAD_TOL, LOSS_TOL, close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)


def poison_allocator(mb=512):
    """Leaves nan in the blocks the caching allocator hands out next."""
    junk = torch.full((mb * 2**18,), float("nan"), device="cuda")
    del junk


def cuda_logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(64, 50257), (2, 9, 300), (3, 7)])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_matches_reference(dtype, shape, beta, reduction):
    student, teacher = cuda_logits(shape, dtype), cuda_logits(shape, dtype, 2.0)
    labels = torch.randint(0, 5, shape[:-1], device="cuda")
    labels.view(-1)[::3] = -100
    kw = dict(beta=beta, temperature=1.5, reduction=reduction)
    poison_allocator()
    s = student.clone().requires_grad_()
    loss = generalized_jsd(s, teacher, labels, **kw)
    s_ref = student.double().clone().requires_grad_()
    want = reference(s_ref, teacher, labels, **kw)
    close(loss, want, LOSS_TOL[dtype])
    poison_allocator()
    loss.sum().backward()
    want.sum().backward()
    close(s.grad, s_ref.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_logits_form(dtype):
    n, hs, ht, v = 200, 64, 96, 5000
    xs = torch.randn(n, hs, device="cuda", dtype=dtype, requires_grad=True)
    ws = (torch.randn(v, hs, device="cuda") * hs ** -0.5).to(dtype).requires_grad_()
    xt = torch.randn(n, ht, device="cuda", dtype=dtype)
    wt = (torch.randn(v, ht, device="cuda") * ht ** -0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::5] = -100
    loss = linear_generalized_jsd(xs, ws, xt, wt, labels, beta=0.4, chunk_size=64)
    want = generalized_jsd((xs @ ws.t()).float(), (xt @ wt.t()).float(), labels, beta=0.4)
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-3)
    gx, gw = torch.autograd.grad(loss, (xs, ws))
    rx, rw = torch.autograd.grad(want, (xs, ws))
    torch.testing.assert_close(gx.float(), rx.float(), atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(gw.float(), rw.float(), atol=1e-3, rtol=2e-2)


def test_compiled_fullgraph():
    student, teacher = cuda_logits((4, 33, 1000), torch.bfloat16), cuda_logits((4, 33, 1000), torch.bfloat16)
    f = torch.compile(generalized_jsd, fullgraph=True)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    out, want = f(s1, teacher, beta=0.5), generalized_jsd(s2, teacher, beta=0.5)
    torch.testing.assert_close(out, want)
    out.backward()
    want.backward()
    torch.testing.assert_close(s1.grad, s2.grad)
