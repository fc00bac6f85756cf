// How the CUDA launcher cuts contiguous rows into blocks. Plain host code,
// compiled into every build, so that the planning is tested without a GPU
// (op fused_softmax_ce::_launch_plan, see csrc/ops.cpp).
#pragma once
#include <cstdint>

namespace fsce {

// `splits` blocks per row of `chunk` columns each; splits == 1 means the
// group-per-row kernels.
struct Split {
  int splits;
  int64_t chunk;
};

constexpr int64_t kMinChunk = 4096;

// The forward splits rows when there are too few of them to give every SM
// two blocks; only class-index rows (probability rows keep the row kernel).
inline Split forward_split(int64_t rows, int64_t classes, int64_t inner, bool prob_target,
                           int64_t sm_count) {
  const int64_t want_blocks = 2 * sm_count;
  // rows == 0 returns here: the division below needs rows > 0.
  if (rows <= 0 || inner != 1 || prob_target || classes < 4 * kMinChunk || rows >= want_blocks)
    return {1, classes};
  int64_t splits = (want_blocks + rows - 1) / rows;
  const int64_t max_splits = classes / kMinChunk;
  splits = splits < max_splits ? splits : max_splits;
  const int64_t chunk = (classes + splits - 1) / splits;
  return {static_cast<int>((classes + chunk - 1) / chunk), chunk};
}

// The backward of class-index rows needs no reduction: cut every large row
// into chunks so that any N fills the GPU.
inline Split backward_split(int64_t inner, int64_t classes, bool prob_target) {
  if (inner != 1 || prob_target || classes <= 2 * kMinChunk) return {1, classes};
  const int64_t chunk = 4 * kMinChunk;
  return {static_cast<int>((classes + chunk - 1) / chunk), chunk};
}

}  // namespace fsce
