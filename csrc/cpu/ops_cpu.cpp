// CPU registrations: the shared binding with the CPU kernels.
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../binding.h"
#include "kernels.h"

namespace fsce {
namespace {

// On the CPU an invalid class index can be reported without a device sync,
// with PyTorch's exception type (IndexError) and message.
void check_targets_cpu(const CEParams& p) {
  const int64_t r = cpu::first_invalid_target(p);
  TORCH_CHECK_INDEX(r < 0, "Target ", r < 0 ? 0 : p.target_index[r], " is out of bounds.");
}

struct NoGuard {
  explicit NoGuard(c10::Device) {}
};

constexpr Kernels kCpu{cpu::forward, cpu::backward, cpu::scale_rows, nullptr, check_targets_cpu};
using CpuOps = BackendOps<&kCpu, NoGuard>;

}  // namespace
}  // namespace fsce

TORCH_LIBRARY_IMPL(fused_softmax_ce, CPU, m) { FSCE_REGISTER_BACKEND(m, fsce::CpuOps); }
