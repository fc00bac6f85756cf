"""A small workload for compute-sanitizer (memcheck, racecheck, synccheck,
initcheck): every kernel family and phase, odd C, invalid targets.

- rows_kernel with 32-thread groups (C <= 2048) and 256-thread rows, in place
  with the row in shared memory (under 48 KB, and past it with the opt-in);
- split_stats / split_finish / split_grad (few rows of many classes);
- spatial_rows_kernel (plain rows, S a multiple of 4) and spatial_kernel;
- scale_kernel (the in-place backward of a per-row grad_output).
"""
import torch

import fused_softmax_ce as fce

torch.manual_seed(0)
sm = torch.cuda.get_device_properties(0).multi_processor_count
SHAPES = [
    ((5, 3), "all"),  # warp rows, fewer classes than lanes
    ((7, 50257), "all"),  # split rows (index targets), 256-thread rows (probabilities)
    ((2 * sm, 4000), "all"),  # 256-thread rows, an 8-16 KB cached row in place
    ((2 * sm, 40000), (torch.bfloat16,)),  # a 80 KB cached row: the shared-memory opt-in
    ((2, 7, 9), "all"),  # spatial_kernel (S odd)
    ((2, 7, 16), "all"),  # spatial_rows_kernel for plain rows
]
ALL = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
for shape, dtypes in SHAPES:
    for dtype in ALL if dtypes == "all" else dtypes:
        c = shape[1]
        x = torch.randn(shape, device="cuda", dtype=dtype)
        target = torch.randint(0, c, (shape[0],) + shape[2:], device="cuda")
        target.view(-1)[0] = -100
        target.view(-1)[-1] = c + 3  # invalid: nan, never an address
        w = torch.rand(c, device="cuda", dtype=dtype)
        probs = torch.rand(shape, device="cuda", dtype=dtype).softmax(1)
        # Plain rows (their own loops and kernels), then every coefficient.
        for tgt, options in ((target, {}), (target, {"weight": w, "label_smoothing": 0.1}),
                             (probs, {"weight": w, "label_smoothing": 0.1})):
            for inplace in (False, True):
                xi = x.clone().requires_grad_() * 1
                # Statistics (their kernel variants) with the coefficients only.
                out = fce.cross_entropy(xi, tgt, reduction="none", inplace_backward=inplace,
                                        return_stats=bool(options), **options)
                loss = out.loss if options else out
                loss.backward(torch.rand_like(loss))
torch.cuda.synchronize()
print("sanitizer workload done")
