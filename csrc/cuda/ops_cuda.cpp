// CUDA registrations: the shared binding with the CUDA kernels, under a
// device guard and on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../binding.h"
#include "kernels.h"

namespace fsce {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void forward_cuda(const CEParams& p, bool write_grad) { cuda::forward(p, write_grad, current_stream()); }
void backward_cuda(const CEParams& p) { cuda::backward(p, current_stream()); }
void scale_rows_cuda(const CEParams& p) { cuda::scale_rows(p, current_stream()); }

// Invalid class indices are not checked on the host: that would need a sync.
constexpr Kernels kCuda{forward_cuda, backward_cuda, scale_rows_cuda, cuda::forward_workspace,
                        nullptr};
using CudaOps = BackendOps<&kCuda, c10::cuda::CUDAGuard>;

}  // namespace
}  // namespace fsce

TORCH_LIBRARY_IMPL(fused_softmax_ce, CUDA, m) { FSCE_REGISTER_BACKEND(m, fsce::CudaOps); }
