// Host launchers of the pixel-head kernels. Plain C++ interface (raw pointers + stream) so the .cu file
// compiles with nvcc alone; csrc/bindings.cpp adapts torch tensors to it.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common.cuh"  // DType

namespace fractal_kernels {

struct SampleLogitsArgs {
  const void* cond;          // [n_rows, V], row stride stride_c elements
  const void* uncond;        // nullptr = no CFG
  const float* cfg_rows;     // nullptr = scalar cfg
  const double* uniforms;    // nullptr = Philox(seed, offset + row)
  int64_t* ids;              // [n_rows]
  float* probs;              // nullptr = do not write; else [n_rows, V] with row stride stride_p
  int64_t n_rows, V, stride_c, stride_uc, stride_p;
  DType dtype;
  float inv_temp, cfg_scalar, filter_threshold, top_p;
  int top_k;                 // 0 = off
  uint64_t seed, offset;
  bool greedy;
};

// Returns cudaSuccess or the launch error. V must be in [1, 1024].
cudaError_t launch_sample_logits(const SampleLogitsArgs& a, cudaStream_t stream);

// logits [M, V] fp32 (row stride `stride`) -> loss [M]; with write_grad the buffer becomes
// (softmax - onehot) * (row_scale ? row_scale[row] : 1), zero on ignored rows.
cudaError_t launch_ce_rows(float* logits, const int64_t* target, float* loss, const float* row_scale,
                           int64_t M, int64_t V, int64_t stride, int64_t ignore_index, bool write_grad,
                           cudaStream_t stream);

}  // namespace fractal_kernels
