// CUDA launchers of the generalized JSD: plain params and a stream in, no
// ATen (see csrc/jsd_params.h); same contracts as csrc/cpu/jsd_kernels.h,
// enqueued on `stream` with no host synchronisation.
#pragma once
#include <cuda_runtime_api.h>

#include "../jsd_params.h"

namespace fsce::cuda {

void jsd_forward(const JsdParams& p, cudaStream_t stream);
void jsd_backward(const JsdParams& p, cudaStream_t stream);

}  // namespace fsce::cuda
