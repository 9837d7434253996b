// Host launchers of the tiny-sequence attention kernels (forward and backward). Plain C++ interface (raw
// pointers + strides + stream) so the .cu file compiles with nvcc alone; csrc/bindings.cpp adapts torch
// tensors to it.
//
// Every tensor is [N, H, L, D] (sequence, head, token, head dim) with a contiguous head dim (stride 1) and
// arbitrary element strides for N, H and L, so q, k, v can be views of a packed qkv projection output
// [N, L, 3*H*D] and o a view of a [N, L, H*D] buffer.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../common.cuh"  // DType

namespace fractal_kernels {

// One [N, H, L, D] operand: element (n, h, l, d) lives at data[n*stride_n + h*stride_h + l*stride_l + d].
struct AttnTensor {
  void* data;
  int64_t stride_n, stride_h, stride_l;  // in elements
};

struct TinyAttentionFwdArgs {
  AttnTensor q, k, v;  // read
  AttnTensor o;        // written, input dtype
  float* lse;          // written, fp32 contiguous [N, H, L]: natural-log log-sum-exp of the scaled scores
  const int* seqlens;  // nullptr = every sequence has L tokens; else int32 [N], values in [0, L]
  int64_t N, H, L, D;  // 1 <= L <= 512; D in {16, 32, 64, 80, 128}
  DType dtype;
  bool causal;         // key j visible to query i iff j <= i
  float scale;         // multiplies q . k
};

struct TinyAttentionBwdArgs {
  AttnTensor dout, q, k, v, o;  // read
  const float* lse;             // read, fp32 contiguous [N, H, L] (from the forward)
  AttnTensor dq, dk, dv;        // written, input dtype
  float* delta;                 // workspace, fp32 contiguous [N, H, L]: rowsum(dout * o), written here
  const int* seqlens;
  int64_t N, H, L, D;
  DType dtype;
  bool causal;
  float scale;
};

// Return cudaSuccess, the launch error, or cudaErrorInvalidValue for an unsupported head dim D / length L.
cudaError_t launch_tiny_attention_fwd(const TinyAttentionFwdArgs& a, cudaStream_t stream);
cudaError_t launch_tiny_attention_bwd(const TinyAttentionBwdArgs& a, cudaStream_t stream);

// True when D is one of the head dims the kernels are compiled for.
inline bool tiny_attention_supports_head_dim(int64_t D) {
  return D == 16 || D == 32 || D == 64 || D == 80 || D == 128;
}

constexpr int64_t kTinyAttentionMaxLen = 512;

}  // namespace fractal_kernels
