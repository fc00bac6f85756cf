// The plain description of one cross-entropy launch. Kernels (CPU and CUDA)
// see only this struct and raw pointers, never ATen, so kernel files stay
// light to compile and the binding layer owns every check.
#pragma once
#include <cstdint>

namespace fsce {

enum class DType : int { Float32, Float64, Float16, BFloat16 };

// Logits are viewed as [outer, C, inner]; a "row" is one (n, s) pair, ordered
// r = n * inner + s, which is also the order of index targets and per-row
// outputs. Inside one n the [C, inner] block is contiguous; n has its own
// stride so that row-padded 2-D logits need no copy.
struct CEParams {
  DType dtype;
  int64_t outer, classes, inner;
  int64_t rows;  // outer * inner

  const void* logits;
  int64_t logits_outer_stride;

  // Exactly one target kind is set: class indices (one per row) or class
  // probabilities laid out like the logits (same dtype).
  const int64_t* target_index;
  const void* target_prob;
  int64_t target_outer_stride;
  // Probabilities in the accumulation type rather than the logits' dtype:
  // float32 targets with half logits (autocast's case) are read as they are.
  bool target_prob_acc;

  const void* weight;      // [C] in the accumulation type (float, or double), or nullptr
  const void* weight_sum;  // device scalar (acc type): sum of weight; nullptr means C
  int64_t ignore_index;
  double label_smoothing;

  // These classes are [class_offset, class_offset + classes) of total_classes
  // (a vocab-parallel shard); 0 and `classes` otherwise. Class-index targets
  // are global, and eps / C uses total_classes.
  int64_t class_offset;
  int64_t total_classes;

  // The logit transform (row_math.h): v = logit_scale * z, then
  // softcap * tanh(v / softcap) when softcap > 0.
  double logit_scale;
  double softcap;

  // Forward outputs, per row: the loss in the accumulation type (float, or
  // double for float64 logits), and the log-sum-exp in double, so that the
  // backward's z - lse stays exact when logits are large (about 1e4).
  void* loss;
  void* lse;

  // Forward, optional per-row outputs (nullptr when not asked for): the
  // first argmax of v as a global class index, and for probability targets
  // the first argmax of the target; -1 for ignored rows.
  int64_t* pred;
  int64_t* target_pred;
  // With stats, the entropy -sum_j p_j log p_j of the row's softmax of v (acc
  // type; 0 for ignored rows); written by the forward, read back by the
  // backward when grad_entropy is set.
  void* entropy;

  // Gradient destination (a fresh tensor, or the logits in in-place mode).
  void* grad;
  int64_t grad_outer_stride;

  // Backward: per-row upstream gradient in the accumulation type, with a
  // stride (0 when one scalar is broadcast over all rows).
  const void* grad_output;
  int64_t grad_output_stride;
  // Backward: per-row upstream gradient of the lse output (acc type,
  // contiguous), or nullptr. It adds grad_lse[r] * p_j to the gradient.
  const void* grad_lse;
  // Backward: per-row upstream gradient of the entropy output (acc type,
  // contiguous), or nullptr. It adds -grad_entropy[r] * p_j (log p_j + H).
  const void* grad_entropy;

  // In-place forward: one device scalar that multiplies the gradient (1/the
  // mean's denominator, or 1), in the accumulation type; and one, or nullptr,
  // that makes h = lse_grad_scale * lse for each row not ignored (the
  // z-loss's gradient, 2 * z_loss_scale / its denominator).
  const void* grad_scale;
  const void* lse_grad_scale;
  // In-place forward: per-row token weights (acc type, contiguous) that
  // multiply the cross-entropy part of the gradient (not the z-loss's), or
  // nullptr for 1.
  const void* row_weight;

  // Scratch memory for multi-kernel strategies (CUDA split rows), sized by
  // the backend's workspace query; nullptr when none was asked for.
  void* workspace;
};

}  // namespace fsce
