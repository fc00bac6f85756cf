// Runs a batch of cases through the real CUDA launchers (csrc/cuda/kernels.cu,
// compiled as host C++ over tools/cuda_emu/simt.h) and writes back every
// buffer. The cases come from tests/emulated.py, which fills each CEParams
// field as csrc/binding.cpp does and compares the results with float64
// PyTorch.
//
//   driver CASES OUT: reads CASES, writes OUT; prints per case "case I" to
//   stderr before it runs (a sanitizer report names the case it broke in),
//   and at the end the launches per kernel family and the device queries.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../csrc/cuda/kernels.h"
#include "case_io.h"

namespace {

using fsce::emu::Buffer;
using fsce::emu::Reader;
using fsce::emu::write;

enum Op : int32_t { kForward = 0, kForwardInplace = 1, kBackward = 2, kScaleRows = 3 };

struct Case {
  int32_t op = 0, device = 0;
  fsce::CEParams p{};
  std::vector<Buffer> buffers;
};

Case read_case(Reader& r) {
  Case c;
  fsce::CEParams& p = c.p;
  c.op = r.get<int32_t>();
  c.device = r.get<int32_t>();
  p.dtype = static_cast<fsce::DType>(r.get<int32_t>());
  p.target_prob_acc = r.get<int32_t>() != 0;
  for (int64_t* f : {&p.outer, &p.classes, &p.inner, &p.rows, &p.logits_outer_stride, &p.target_outer_stride,
                     &p.ignore_index, &p.class_offset, &p.total_classes, &p.grad_outer_stride,
                     &p.grad_output_stride})
    *f = r.get<int64_t>();
  for (double* f : {&p.label_smoothing, &p.logit_scale, &p.softcap}) *f = r.get<double>();
  // CEParams' pointers in the order tests/emulated.py writes them.
  const std::vector<void*> at = fsce::emu::read_pointers(r, 17, c.buffers);
  const auto ptr = [&](int k) { return at[k]; };
  p.logits = ptr(0);
  p.target_index = static_cast<const int64_t*>(ptr(1));
  p.target_prob = ptr(2);
  p.weight = ptr(3);
  p.weight_sum = ptr(4);
  p.loss = ptr(5);
  p.lse = ptr(6);
  p.pred = static_cast<int64_t*>(ptr(7));
  p.target_pred = static_cast<int64_t*>(ptr(8));
  p.grad = ptr(9);
  p.grad_output = ptr(10);
  p.grad_lse = ptr(11);
  p.grad_scale = ptr(12);
  p.lse_grad_scale = ptr(13);
  p.entropy = ptr(14);
  p.grad_entropy = ptr(15);
  p.row_weight = ptr(16);
  return c;
}

// Runs one case as the binding would; returns an error message or "" (a
// thrown error becomes the message: case_io.h's drive).
std::string run_case(Case& c) {
  C10_CUDA_CHECK(cudaSetDevice(c.device));
  if (c.op == kForward || c.op == kForwardInplace) {
    const int64_t bytes = fsce::cuda::forward_workspace(c.p);
    if (bytes > 0) {
      c.buffers.emplace_back(static_cast<uint64_t>(bytes));
      std::memset(c.buffers.back().data, 0xff, bytes);  // poisoned, as a fresh workspace may be
      c.p.workspace = c.buffers.back().data;
    }
    fsce::cuda::forward(c.p, c.op == kForwardInplace, nullptr);
  } else if (c.op == kBackward) {
    fsce::cuda::backward(c.p, nullptr);
  } else if (c.op == kScaleRows) {
    fsce::cuda::scale_rows(c.p, nullptr);
  } else {
    return "unknown op " + std::to_string(c.op);
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) { return fsce::emu::drive(argc, argv, read_case, run_case); }
