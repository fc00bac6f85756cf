// CPU kernels: plain params in, raw memory out (see csrc/params.h).
#pragma once
#include <cstdint>

#include "../params.h"

namespace fsce::cpu {

// Fills loss and lse per row; with write_grad (the in-place mode) also writes
// grad_scale * dloss/dlogits into p.grad while the row is still in cache.
void forward(const CEParams& p, bool write_grad);

// grad = grad_output[r] * dloss_r/dlogits, recomputing softmax from the lse.
void backward(const CEParams& p);

// Multiplies row r of p.grad by grad_output[r * grad_output_stride]; returns at
// once when the stride is 0 and the scalar is 1.
void scale_rows(const CEParams& p);

// Index of the first row whose class index is neither in [0, C) nor the
// ignore_index, or -1.
int64_t first_invalid_target(const CEParams& p);

// The name of the kernels a launch runs now (see isa.h): "avx512-bf16",
// "avx512", "avx2" or "baseline".
const char* isa_name();

}  // namespace fsce::cpu
