"""CUDA-only checks: graph capture, determinism, poisoned memory, invalid targets, N*C > 2^31."""
import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from conftest import CUDA_SKIP_REASON, assert_close, random_logits, random_targets, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)


def poison_allocator(mb=512):
    """Leaves nan in the blocks the caching allocator hands out next."""
    junk = torch.full((mb * 2**18,), float("nan"), device="cuda")
    del junk


@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_graph_capture(inplace):
    base = random_logits((64, 50257), torch.bfloat16, "cuda")
    target = random_targets(50257, (64,), "cuda", ignore_index=-100)
    static_x = base.clone().requires_grad_()

    def step():
        static_x.grad = None
        logits = static_x * 1
        loss = fce.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=inplace)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()
    graph.replay()
    torch.cuda.synchronize()
    expected = reference(base, target, label_smoothing=0.1)
    assert_close(static_loss, expected, torch.bfloat16)
    x_ref = base.double().requires_grad_()
    reference(x_ref, target, label_smoothing=0.1).backward()
    assert_close(static_x.grad, x_ref.grad, torch.bfloat16)


@pytest.mark.parametrize("shape", [(512, 50257), (4, 7, 33, 5)])
def test_bitwise_deterministic(shape):
    x = random_logits(shape, torch.bfloat16, "cuda")
    target = random_targets(shape[1], (shape[0],) + shape[2:], "cuda")

    def run():
        xi = x.clone().requires_grad_()
        loss = fce.cross_entropy(xi, target, label_smoothing=0.1)
        loss.backward()
        return loss.detach(), xi.grad

    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(33, 50257), (300, 1000), (3, 5, 17)])
def test_every_output_is_written(dtype, shape):
    x = random_logits(shape, dtype, "cuda")
    target = random_targets(shape[1], (shape[0],) + shape[2:], "cuda", ignore_index=-100)
    poison_allocator()
    xi = x.clone().requires_grad_()
    loss = fce.cross_entropy(xi, target, reduction="none")
    loss.backward(torch.ones_like(loss))
    assert not torch.isnan(loss).any()
    assert not torch.isnan(xi.grad).any()


def test_invalid_target_poisons_its_row_without_crashing():
    x = random_logits((4, 10), torch.float32, "cuda").requires_grad_()
    target = torch.tensor([1, 10, -5, 3], device="cuda")
    loss = fce.cross_entropy(x, target, reduction="none")
    loss.sum().backward()
    torch.cuda.synchronize()  # a device-side fault would surface here
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(x.grad[1:3]).all() and torch.isfinite(x.grad[[0, 3]]).all()
    assert torch.isnan(fce.cross_entropy(x, target))


def test_more_than_2_to_31_elements():
    n, c = 16400, 131072  # 2.15e9 bf16 logits, 4 GiB; the gradient needs as much again
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * c * 2:
        pytest.skip(f"needs {3 * n * c * 2 / 2**30:.1f} GiB free, have {free / 2**30:.1f}")
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, c, (n,), device="cuda")
    loss = fce.cross_entropy(x, target, reduction="none")
    loss.sum().backward()
    for row in (0, n // 2, n - 1):  # rows past the 2^31st element included
        expected = F.cross_entropy(x[row : row + 1].double(), target[row : row + 1], reduction="none")
        assert_close(loss[row : row + 1], expected, torch.bfloat16)
        g = torch.softmax(x[row].double(), 0)
        g[target[row]] -= 1
        assert_close(x.grad[row], g, torch.bfloat16)


def logits_at(x, offset):
    """x's values in a fresh buffer that starts `offset` elements past an aligned address, in the graph."""
    buf = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    out = buf[offset:].view(x.shape)
    out.copy_(x)
    return out


# S = 8 and 24 with offset 0: spatial_rows_kernel (V adjacent rows per thread);
# S = 5, or logits 1 element off an 8-byte boundary: spatial_kernel.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 8), (2, 5, 4, 6), (2, 6, 5)])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("inplace", [False, True])
def test_spatial_rows(dtype, shape, offset, inplace):
    x = random_logits(shape, dtype, "cuda").requires_grad_()
    target = random_targets(shape[1], (shape[0],) + shape[2:], "cuda", ignore_index=-100, ignore_every=5)
    weight = (torch.rand(shape[1], device="cuda") + 0.1).to(dtype)
    loss = fce.cross_entropy(logits_at(x, offset), target, weight, reduction="sum", inplace_backward=inplace)
    loss.backward()
    x_ref = x.detach().double().requires_grad_()
    expected = reference(x_ref, target, weight, reduction="sum")
    expected.backward()
    assert_close(loss, expected, dtype)
    assert_close(x.grad, x_ref.grad, dtype)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("inplace", [False, True])
def test_spatial_invalid_target_poisons_its_row(offset, inplace):
    x = random_logits((2, 5, 8), torch.bfloat16, "cuda").requires_grad_()
    target = random_targets(5, (2, 8), "cuda")
    target[1, 3] = 99
    loss = fce.cross_entropy(logits_at(x, offset), target, reduction="none", inplace_backward=inplace)
    loss.backward(torch.ones_like(loss))
    bad = torch.zeros(2, 8, dtype=torch.bool, device="cuda")
    bad[1, 3] = True
    assert torch.isnan(loss[bad]).all() and torch.isfinite(loss[~bad]).all()
    grad = x.grad.movedim(1, -1)  # (N, S, C)
    assert torch.isnan(grad[bad]).all() and torch.isfinite(grad[~bad]).all()


# In place, 256-thread rows (C > 2048) of up to 112 KB (H100) keep their
# vectors in shared memory between the two passes; longer ones read the row
# twice.
# 300 rows: enough for the row kernels (no split). C = 3001: a scalar head
# and tail around the vectors. 12288 (fp32) and 24576 (bf16): a 48 KB row,
# which needs the shared-memory opt-in only with the static memory counted;
# 57344 / 57345 (bf16): H100's largest cached row, and one past it.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [3001, 12288, 24576, 32000, 57344, 57345, 60000])
@pytest.mark.parametrize("weighted", [False, True])
def test_inplace_long_rows(dtype, c, weighted):
    x = random_logits((300, c), dtype, "cuda").requires_grad_()
    target = random_targets(c, (300,), "cuda", ignore_index=-100)
    weight = (torch.rand(c, device="cuda") + 0.1).to(dtype) if weighted else None
    loss = fce.cross_entropy(x * 1, target, weight, inplace_backward=True)
    loss.backward()
    x_ref = x.detach().double().requires_grad_()
    expected = reference(x_ref, target, weight)
    expected.backward()
    assert_close(loss, expected, dtype)
    assert_close(x.grad, x_ref.grad, dtype)
