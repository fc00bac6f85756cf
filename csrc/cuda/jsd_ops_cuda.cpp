// CUDA registrations of the generalized-JSD ops: the shared binding with the
// CUDA kernels, under a device guard and on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../jsd_binding.h"
#include "jsd_kernels.h"

namespace fsce {
namespace {

void jsd_forward_cuda(const JsdParams& p) { cuda::jsd_forward(p, c10::cuda::getCurrentCUDAStream().stream()); }
void jsd_backward_cuda(const JsdParams& p) { cuda::jsd_backward(p, c10::cuda::getCurrentCUDAStream().stream()); }

constexpr JsdKernels kJsdCuda{jsd_forward_cuda, jsd_backward_cuda};
using JsdCudaOps = JsdOps<&kJsdCuda, c10::cuda::CUDAGuard>;

}  // namespace
}  // namespace fsce

TORCH_LIBRARY_IMPL(fused_softmax_ce, CUDA, m) { FSCE_REGISTER_JSD_BACKEND(m, fsce::JsdCudaOps); }
