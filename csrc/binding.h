// The binding layer shared by every backend: it checks the op's inputs, makes
// the layouts the kernels walk, allocates outputs and fills a CEParams. Each
// backend file (csrc/cpu, csrc/cuda) only supplies its kernels and, for CUDA,
// the device guard.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "params.h"
#include "row_options.h"

namespace fsce {

// The logits' DType (raises for other dtypes) and accumulation type (float,
// or double for float64); shared with the generalized JSD's binding.
DType dtype_of(const at::Tensor& t);
at::ScalarType acc_type(const at::Tensor& logits);

struct Kernels {
  void (*forward)(const CEParams&, bool write_grad);
  void (*backward)(const CEParams&);
  void (*scale_rows)(const CEParams&);
  // Bytes of scratch the forward needs (nullptr: none).
  int64_t (*forward_workspace)(const CEParams&);
  // Raises on an invalid class index where that costs no host sync (CPU);
  // nullptr where it would (CUDA poisons the row's loss with nan instead).
  void (*check_targets)(const CEParams&);
};

// The per-row options every op takes (row_options.h); total_classes < 0:
// the logits' class count.
struct RowOptions {
  FSCE_ROW_OPTIONS(FSCE_OPTION_MEMBER)
  FSCE_SHARD_OPTIONS(FSCE_OPTION_MEMBER)
};

// loss, lse, entropy, pred, target_pred (the last three empty without stats).
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOutputs run_forward(const Kernels& k, const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const RowOptions& o, bool stats);

at::Tensor run_backward(const Kernels& k, const at::Tensor& grad_output,
                        const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                        const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        const at::Tensor& lse, const std::optional<at::Tensor>& grad_entropy,
                        const std::optional<at::Tensor>& entropy, const RowOptions& o);

ForwardOutputs run_forward_inplace(const Kernels& k, const at::Tensor& logits,
                                   const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight,
                                   const at::Tensor& grad_scale,
                                   const std::optional<at::Tensor>& lse_grad_scale,
                                   const std::optional<at::Tensor>& token_weight, const RowOptions& o,
                                   bool stats);

void run_scale_grad(const Kernels& k, const at::Tensor& grad, const at::Tensor& grad_output);

// The RowOptions of an entry point's parameters.
#define FSCE_ROW_OPTION_VALUES \
  RowOptions { FSCE_ROW_OPTIONS(FSCE_OPTION_VALUE) FSCE_SHARD_OPTIONS(FSCE_OPTION_VALUE) }

// The op entry points of one backend: its kernels, and a guard constructed
// from the logits' device around every call (CUDA's device guard, or nothing).
template <const Kernels* K, typename Guard>
struct BackendOps {
  static ForwardOutputs forward(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight FSCE_ROW_OPTIONS(FSCE_OPTION_PARAM),
                                bool stats FSCE_SHARD_OPTIONS(FSCE_OPTION_PARAM)) {
    Guard guard(logits.device());
    return run_forward(*K, logits, target, weight, FSCE_ROW_OPTION_VALUES, stats);
  }

  static at::Tensor backward(const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_lse,
                             const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight,
                             const at::Tensor& lse FSCE_ROW_OPTIONS(FSCE_OPTION_PARAM),
                             const std::optional<at::Tensor>& grad_entropy,
                             const std::optional<at::Tensor>& entropy FSCE_SHARD_OPTIONS(FSCE_OPTION_PARAM)) {
    Guard guard(logits.device());
    return run_backward(*K, grad_output, grad_lse, logits, target, weight, lse, grad_entropy, entropy,
                        FSCE_ROW_OPTION_VALUES);
  }

  static ForwardOutputs forward_inplace(const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight,
                                        const at::Tensor& grad_scale FSCE_ROW_OPTIONS(FSCE_OPTION_PARAM),
                                        const std::optional<at::Tensor>& lse_grad_scale,
                                        bool stats, const std::optional<at::Tensor>& token_weight
                                            FSCE_SHARD_OPTIONS(FSCE_OPTION_PARAM)) {
    Guard guard(logits.device());
    return run_forward_inplace(*K, logits, target, weight, grad_scale, lse_grad_scale, token_weight,
                               FSCE_ROW_OPTION_VALUES, stats);
  }

  static void scale_grad(const at::Tensor& grad, const at::Tensor& grad_output) {
    Guard guard(grad.device());
    run_scale_grad(*K, grad, grad_output);
  }
};

#define FSCE_REGISTER_BACKEND(m, Ops)                     \
  do {                                                    \
    (m).impl("ce_forward", &Ops::forward);                \
    (m).impl("ce_backward", &Ops::backward);              \
    (m).impl("ce_forward_inplace", &Ops::forward_inplace); \
    (m).impl("scale_grad_", &Ops::scale_grad);            \
  } while (0)

}  // namespace fsce
