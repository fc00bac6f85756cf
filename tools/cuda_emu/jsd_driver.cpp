// Runs a batch of generalized-JSD cases through the real CUDA launchers
// (csrc/cuda/jsd.cu, compiled as host C++ over tools/cuda_emu/simt.h) and
// writes back every buffer; as driver.cpp does for the cross-entropy. The
// cases come from tests/test_jsd_emulated.py, which fills each JsdParams
// field as csrc/jsd_binding.cpp does.
//
//   jsd_driver CASES OUT
#include <cstdio>
#include <string>
#include <vector>

#include "../../csrc/cuda/jsd_kernels.h"
#include "case_io.h"

namespace {

enum Op : int32_t { kForward = 0, kBackward = 1 };

struct Case {
  int32_t op = 0, device = 0;
  fsce::JsdParams p{};
  std::vector<fsce::emu::Buffer> buffers;
};

Case read_case(fsce::emu::Reader& r) {
  Case c;
  fsce::JsdParams& p = c.p;
  c.op = r.get<int32_t>();
  c.device = r.get<int32_t>();
  p.dtype = static_cast<fsce::DType>(r.get<int32_t>());
  for (int64_t* f : {&p.rows, &p.classes, &p.student_stride, &p.teacher_stride, &p.ignore_index,
                     &p.grad_output_stride, &p.grad_stride})
    *f = r.get<int64_t>();
  for (double* f : {&p.beta, &p.temperature}) *f = r.get<double>();
  // JsdParams' pointers in the order tests/test_jsd_emulated.py writes them.
  const std::vector<void*> at = fsce::emu::read_pointers(r, 7, c.buffers);
  p.student = at[0];
  p.teacher = at[1];
  p.labels = static_cast<const int64_t*>(at[2]);
  p.loss = at[3];
  p.row_stats = at[4];
  p.grad_output = at[5];
  p.grad = at[6];
  return c;
}

std::string run_case(Case& c) {
  C10_CUDA_CHECK(cudaSetDevice(c.device));
  if (c.op == kForward) {
    fsce::cuda::jsd_forward(c.p, nullptr);
  } else if (c.op == kBackward) {
    fsce::cuda::jsd_backward(c.p, nullptr);
  } else {
    return "unknown op " + std::to_string(c.op);
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) { return fsce::emu::drive(argc, argv, read_case, run_case); }
