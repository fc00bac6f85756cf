"""Shared test helpers: devices, dtypes, the tolerance table and the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (atol, rtol) against a float64 reference computed from the same (rounded)
# inputs. Low-precision entries are set by the rounding of the outputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-6, 2e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
}

CUDA_SKIP_REASON = "no CUDA device: the CUDA kernels are compiled but cannot run here"


def device_param(devices=DEVICES):
    return pytest.mark.parametrize("device", devices)


def random_logits(shape, dtype, device, scale=3.0):
    """Fresh normal logits (never zeros), rounded to dtype."""
    return (torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype)


def random_targets(n_classes, shape, device, ignore_index=None, ignore_every=4):
    t = torch.randint(0, max(n_classes, 1), shape, device=device)
    if ignore_index is not None and t.numel() > 1:
        t.view(-1)[::ignore_every] = ignore_index
    return t


def random_probs(shape, dtype, device):
    """Fresh probability targets over dim 1, drawn in float64, rounded to dtype."""
    return torch.rand(shape, dtype=torch.float64, device=device).softmax(1).to(dtype)


def random_target(shape, dtype, device, prob, ignore_index=None, ignore_every=4):
    """A target for logits of `shape`: probabilities (random_probs) or class indices."""
    if prob:
        return random_probs(shape, dtype, device)
    return random_targets(shape[1], (shape[0],) + tuple(shape[2:]), device, ignore_index=ignore_index,
                          ignore_every=ignore_every)


def compare_with_eager(loss_fn, compiled, x, *args):
    """Runs loss_fn and its compiled version on fresh leaves copied from x;
    checks their loss (the first output when they return a tuple) and the
    gradient of x in float32; returns (eager output, compiled output)."""
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = loss_fn(x_eager, *args), compiled(x_comp, *args)

    def loss(out):
        return out[0] if isinstance(out, tuple) else out

    loss(expected).backward()
    loss(got).backward()  # through the compiled graph's autograd
    assert_close(loss(got), loss(expected), torch.float32)
    assert_close(x_comp.grad, x_eager.grad, torch.float32)
    return expected, got


def reference(logits, target, weight=None, **kwargs):
    """PyTorch's cross_entropy in float64 on the same values."""
    target64 = target.double() if target.is_floating_point() else target
    w64 = None if weight is None else weight.double()
    return F.cross_entropy(logits.double(), target64, weight=w64, **kwargs)


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True
    )
