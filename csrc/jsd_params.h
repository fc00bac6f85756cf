// The plain description of one generalized-JSD launch (fused_softmax_ce.jsd):
// kernels see only this struct and raw pointers, as with CEParams.
#pragma once
#include <cstdint>

#include "params.h"  // DType

namespace fsce {

// Student and teacher logits are `rows` rows of `classes` contiguous values,
// row r at r * its row stride; both have the same dtype.
struct JsdParams {
  DType dtype;
  int64_t rows, classes;

  const void* student;
  int64_t student_stride;
  const void* teacher;
  int64_t teacher_stride;

  // Class labels (rows), or nullptr: a row whose label is ignore_index is
  // left out (loss 0, gradient 0).
  const int64_t* labels;
  int64_t ignore_index;

  double beta;         // 0: KL(teacher || student); 1: KL(student || teacher)
  double temperature;  // v = z / temperature

  // Forward outputs, both in the accumulation type (float, or double):
  // loss[r], and row_stats[r * kJsdStats + k] (jsd_math.h's RowStats), all
  // the backward keeps of the row.
  void* loss;
  void* row_stats;

  // Backward: grad[r] = grad_output[r * grad_output_stride] * dloss_r/dz_s
  // (stride 0: one scalar for every row); grad may be the student itself
  // (the chunked linear form writes in place).
  const void* grad_output;
  int64_t grad_output_stride;
  void* grad;
  int64_t grad_stride;
};

}  // namespace fsce
