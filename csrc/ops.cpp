// Op schemas. Backends register kernels in csrc/cpu and csrc/cuda; fake
// kernels and autograd are registered from Python (fused_softmax_ce/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "launch_plan.h"
#include "row_options.h"

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

// Every row op takes the options of row_options.h after its tensors.
#define FSCE_ROW FSCE_ROW_OPTIONS(FSCE_OPTION_SCHEMA)
#define FSCE_SHARD FSCE_SHARD_OPTIONS(FSCE_OPTION_SCHEMA)

TORCH_LIBRARY(fused_softmax_ce, m) {
  // logits (N, C) or (N, C, S); target int64 (N*S,) or probabilities shaped
  // like logits. Returns per row the loss (fp32, or fp64 for float64 logits),
  // the log-sum-exp in fp64 (all the backward keeps of the row), and with
  // stats the first argmax of the effective logits and of a probability
  // target (int64, empty without stats), after the entropy of the softmax
  // (the loss's dtype, empty without stats).
  m.def("ce_forward(Tensor logits, Tensor target, Tensor? weight" FSCE_ROW ", bool stats=False" FSCE_SHARD
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // dloss/dlogits for upstream gradients of the loss and (optionally) the lse
  // and the entropy (with the forward's entropy).
  m.def("ce_backward(Tensor grad_output, Tensor? grad_lse, Tensor logits, Tensor target, "
        "Tensor? weight, Tensor lse" FSCE_ROW ", Tensor? grad_entropy=None, Tensor? entropy=None" FSCE_SHARD
        ") -> Tensor");
  // Writes grad_scale * (token_weight *) dloss/dlogits (+ lse_grad_scale *
  // lse * softmax, the z-loss) into logits; returns what ce_forward returns.
  m.def("ce_forward_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor grad_scale"
        FSCE_ROW ", Tensor? lse_grad_scale=None, bool stats=False, Tensor? token_weight=None" FSCE_SHARD
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad *= grad_output, per row; free when grad_output is the scalar 1.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // Which CPU kernels run (fused_softmax_ce.cpu_isa()).
  m.def("cpu_isa() -> str", [] { return std::string(fsce::cpu::isa_name()); });
  m.def("_launch_plan(int rows, int classes, int inner, bool prob_target, int sm_count) -> int[]",
        &launch_plan);
}
