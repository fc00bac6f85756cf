// CPU kernels of the generalized JSD: plain params in, raw memory out
// (csrc/jsd_params.h; math in csrc/jsd_math.h).
#pragma once
#include "../jsd_params.h"

namespace fsce::cpu {

// loss and row_stats per row: reads each student and teacher row twice
// (the log-sums, then the terms), row after row while it is in cache.
void jsd_forward(const JsdParams& p);

// grad = grad_output[r] * dloss_r/dz_student: one read of both rows.
void jsd_backward(const JsdParams& p);

}  // namespace fsce::cpu
