"""A small workload for compute-sanitizer memcheck: every kernel path, odd C, invalid targets."""
import torch

import fused_softmax_ce as fce

torch.manual_seed(0)
for shape in [(5, 3), (7, 50257), (3, 40000), (2, 7, 9)]:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        c = shape[1]
        x = torch.randn(shape, device="cuda", dtype=dtype)
        target = torch.randint(0, c, (shape[0],) + shape[2:], device="cuda")
        target.view(-1)[0] = -100
        target.view(-1)[-1] = c + 3  # invalid: nan, never an address
        w = torch.rand(c, device="cuda", dtype=dtype)
        probs = torch.rand(shape, device="cuda", dtype=dtype).softmax(1)
        for tgt in (target, probs):
            for inplace in (False, True):
                xi = (x.clone().requires_grad_() * 1)
                loss = fce.cross_entropy(xi, tgt, weight=w, label_smoothing=0.1, reduction="none",
                                         inplace_backward=inplace)
                loss.backward(torch.rand_like(loss))
torch.cuda.synchronize()
print("sanitizer workload done")
