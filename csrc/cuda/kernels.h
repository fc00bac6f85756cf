// CUDA launchers: plain params and a stream in, no ATen (see csrc/params.h).
#pragma once
#include <cuda_runtime_api.h>

#include "../params.h"

namespace fsce::cuda {

// Same contracts as the CPU kernels (csrc/cpu/kernels.h), enqueued on
// `stream` with no host synchronisation. An invalid class index gives nan
// loss and gradient for its row and is never used as an address.
void forward(const CEParams& p, bool write_grad, cudaStream_t stream);
// Bytes of p.workspace the forward needs (split rows), 0 for none.
int64_t forward_workspace(const CEParams& p);
void backward(const CEParams& p, cudaStream_t stream);
void scale_rows(const CEParams& p, cudaStream_t stream);

}  // namespace fsce::cuda
