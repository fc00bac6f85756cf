// Op schemas. Backends register kernels in csrc/cpu and csrc/cuda; fake
// kernels and autograd are registered from Python (fused_softmax_ce/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "launch_plan.h"

namespace {

// The CUDA launch plan as [forward splits, forward chunk, backward splits,
// backward chunk], for tests of the host-side planning on any machine.
std::vector<int64_t> launch_plan(int64_t rows, int64_t classes, int64_t inner, bool prob_target,
                                 int64_t sm_count) {
  const fsce::Split f = fsce::forward_split(rows, classes, inner, prob_target, sm_count);
  const fsce::Split b = fsce::backward_split(inner, classes, prob_target);
  return {f.splits, f.chunk, b.splits, b.chunk};
}

}  // namespace

// Importing the compiled module from Python is what loads these
// registrations; it has no Python-level functions of its own.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fused_softmax_ce, m) {
  // logits (N, C) or (N, C, S); target int64 (N*S,) or probabilities shaped
  // like logits. Returns the per-row loss (fp32, or fp64 for float64 logits)
  // and the per-row log-sum-exp in fp64, all the backward keeps of the row.
  m.def(
      "ce_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing) -> (Tensor, Tensor)");
  m.def(
      "ce_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, int ignore_index, float label_smoothing) -> Tensor");
  // Writes grad_scale * dloss/dlogits into logits and returns the per-row loss.
  m.def(
      "ce_forward_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor grad_scale, "
      "int ignore_index, float label_smoothing) -> Tensor");
  // grad *= grad_output, per row; free when grad_output is the scalar 1.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  m.def("_launch_plan(int rows, int classes, int inner, bool prob_target, int sm_count) -> int[]",
        &launch_plan);
}
