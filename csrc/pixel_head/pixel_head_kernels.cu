// Pixel-head kernels: the fused sampler and the cross-entropy row kernel, one warp per row.
//
// Each lane owns ELEMS consecutive columns (V <= 32 * ELEMS), so the CDF (the sampler contract's exact int64
// fixed point, see fractal_kernels/reference/pixel_sampling.py) is a per-lane prefix sum plus a warp scan,
// and every row reduction is a 5-step shuffle. No sort: top-k / top-p thresholds are
// found by bisection on the fp32 bit patterns of the probabilities (31 warp reductions), exactly as the
// Triton kernel and the PyTorch reference define them. Randomness: Philox4x32-10 keyed by
// (seed, offset + row), identical to fractal_kernels/reference/philox.py.
#include "pixel_head_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cfloat>
#include <cmath>

namespace fractal_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // 4 warps per block, one row each
constexpr unsigned kFull = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float sanitize(float x) {
  if (x != x) return -INFINITY;       // NaN: never drawn
  if (x == INFINITY) return FLT_MAX;  // +inf: shares the mass with other +inf entries
  return x;
}

__device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t ctr) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return static_cast<float>(c0 >> 8) * (1.0f / 16777216.0f);
}

// Largest t present in p with  count(p >= t) >= target  (USE_MASS: mass(p >= t) >= target).
template <int ELEMS, bool USE_MASS>
__device__ float bisect_threshold(const float (&p)[ELEMS], const bool (&live)[ELEMS], float target) {
  int lo = 0, hi = 0x3F800001;  // just above 1.0
  for (int it = 0; it < 31; ++it) {
    const int mid = lo + (hi - lo) / 2;
    const float t = __int_as_float(mid);
    float score = 0.f;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j)
      if (live[j] && p[j] >= t) score += USE_MASS ? p[j] : 1.f;
    score = warp_sum(score);
    if (score >= target) lo = mid; else hi = mid;
  }
  return __int_as_float(lo);
}

template <int ELEMS>
__device__ void truncate_renorm(float (&p)[ELEMS], const bool (&live)[ELEMS], float t, bool valid) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) { p[j] = (live[j] && p[j] >= t) ? p[j] : 0.f; s += p[j]; }
  s = warp_sum(s);
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) p[j] = valid ? p[j] / s : 0.f;
}

template <int ELEMS, typename T>
__global__ void sample_logits_kernel(SampleLogitsArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= a.n_rows) return;  // whole warp exits together
  const T* cond = static_cast<const T*>(a.cond) + row * a.stride_c;
  float x[ELEMS];
  bool live[ELEMS];
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) {
    const int64_t col = static_cast<int64_t>(lane) * ELEMS + j;
    live[j] = col < a.V;
    x[j] = live[j] ? sanitize(to_float(cond[col]) * a.inv_temp) : -INFINITY;
  }
  if (a.uncond != nullptr) {
    const T* uncond = static_cast<const T*>(a.uncond) + row * a.stride_uc;
    float u[ELEMS];
    float cmax = -INFINITY, umax = -INFINITY;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) {
      const int64_t col = static_cast<int64_t>(lane) * ELEMS + j;
      u[j] = live[j] ? sanitize(to_float(uncond[col]) * a.inv_temp) : -INFINITY;
      cmax = fmaxf(cmax, x[j]);
      umax = fmaxf(umax, u[j]);
    }
    cmax = warp_max(cmax);
    umax = warp_max(umax);
    float csum = 0.f;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) csum += live[j] ? expf(x[j] - cmax) : 0.f;
    csum = warp_sum(csum);
    const float w = a.cfg_rows != nullptr ? a.cfg_rows[row] : a.cfg_scalar;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) {
      const float pc = expf(x[j] - cmax) / csum;
      const float uu = (pc < a.filter_threshold) ? fmaxf(u[j], x[j] - cmax + umax) : u[j];
      x[j] = live[j] ? sanitize(uu + w * (x[j] - uu)) : -INFINITY;
    }
  }
  float xmax = -INFINITY;
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) xmax = fmaxf(xmax, x[j]);
  xmax = warp_max(xmax);
  const bool valid = xmax > -INFINITY;
  const float shift = valid ? xmax : 0.f;
  float p[ELEMS];
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) { p[j] = live[j] ? expf(x[j] - shift) : 0.f; s += p[j]; }
  s = warp_sum(s);
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) p[j] = valid ? p[j] / s : 0.f;
  if (a.top_k > 0 && a.top_k < a.V) {
    const float t = bisect_threshold<ELEMS, false>(p, live, static_cast<float>(a.top_k));
    truncate_renorm<ELEMS>(p, live, t, valid);
  }
  if (a.top_p < 1.f) {
    const float t = bisect_threshold<ELEMS, true>(p, live, a.top_p);
    truncate_renorm<ELEMS>(p, live, t, valid);
  }
  int64_t idx;
  if (a.greedy) {
    // first index of the maximum logit
    int best = INT32_MAX;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j)
      if (live[j] && x[j] == xmax) best = min(best, lane * ELEMS + j);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = min(best, __shfl_xor_sync(kFull, best, o));
    idx = best;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) p[j] = (valid && lane * ELEMS + j == best) ? 1.f : 0.f;
  } else {
    const double uni = a.uniforms != nullptr ? a.uniforms[row]
                                             : static_cast<double>(philox_uniform(a.seed, a.offset + row));
    // the sampler contract's draw (fractal_kernels/reference/pixel_sampling.py): q = trunc(p * 2^52) is exact
    // and so are its int64 prefix sums, so this lane scan + warp scan equals every other backend's CDF bit for
    // bit; t = u * T < T = C[V-1], and the first index with C > t has q > 0 (no clamp, never p = 0)
    long long local[ELEMS];
    long long run = 0;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) {
      run += live[j] ? static_cast<long long>(p[j] * 4503599627370496.0f) : 0ll;  // rz conversion: trunc
      local[j] = run;
    }
    long long incl = run;  // warp inclusive scan of the lane totals
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const long long n = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += n;
    }
    const long long total = __shfl_sync(kFull, incl, kWarp - 1);
    const long long before = incl - run;
    const double u = uni > 0.0 ? uni : 0.0;  // NaN, u <= 0 -> 0
    const double tot = static_cast<double>(total);
    const double target = u < 1.0 ? __dmul_rn(u, tot) : tot - 1.0;  // u >= 1: the largest double below 1
    int below = 0;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) below += (live[j] && static_cast<double>(before + local[j]) <= target) ? 1 : 0;
    below = warp_sum_int(below);
    idx = total > 0 ? static_cast<int64_t>(below) : -1;
  }
  if (lane == 0) a.ids[row] = valid ? idx : -1;
  if (a.probs != nullptr) {
    float* out = a.probs + row * a.stride_p;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) {
      const int64_t col = static_cast<int64_t>(lane) * ELEMS + j;
      if (live[j]) out[col] = p[j];
    }
  }
}

template <int ELEMS>
__global__ void ce_rows_kernel(float* logits, const int64_t* target, float* loss, const float* row_scale,
                               int64_t M, int64_t V, int64_t stride, int64_t ignore_index, bool write_grad) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= M) return;
  float* x = logits + row * stride;
  const int64_t t = target[row];
  const bool valid = t != ignore_index;
  const bool bad = valid && (t < 0 || t >= V);  // out-of-range target: a NaN row (no host check on CUDA)
  float v[ELEMS];
  float mx = -INFINITY, xt = 0.f;
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) {
    const int64_t col = static_cast<int64_t>(lane) * ELEMS + j;
    v[j] = col < V ? x[col] : -INFINITY;
    mx = fmaxf(mx, v[j]);
    if (col == t) xt = v[j];
  }
  mx = warp_max(mx);
  xt = warp_sum(xt);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) s += expf(v[j] - mx);
  s = warp_sum(s);
  const float lse = mx + logf(s);
  if (lane == 0) loss[row] = valid ? (bad ? NAN : lse - xt) : 0.f;
  if (!write_grad) return;
  const float scale = valid ? (bad ? NAN : (row_scale != nullptr ? row_scale[row] : 1.f)) : 0.f;
#pragma unroll
  for (int j = 0; j < ELEMS; ++j) {
    const int64_t col = static_cast<int64_t>(lane) * ELEMS + j;
    if (col < V) x[col] = (expf(v[j] - mx) / s - (col == t ? 1.f : 0.f)) * scale;
  }
}

template <int ELEMS>
cudaError_t sample_for_elems(const SampleLogitsArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.n_rows + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 block(kWarp * kRowsPerBlock);
  switch (a.dtype) {
    case DType::kFloat32: sample_logits_kernel<ELEMS, float><<<grid, block, 0, stream>>>(a); break;
    case DType::kFloat16: sample_logits_kernel<ELEMS, __half><<<grid, block, 0, stream>>>(a); break;
    case DType::kBFloat16: sample_logits_kernel<ELEMS, __nv_bfloat16><<<grid, block, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

template <int ELEMS>
cudaError_t ce_for_elems(float* logits, const int64_t* target, float* loss, const float* row_scale, int64_t M,
                         int64_t V, int64_t stride, int64_t ignore_index, bool write_grad, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock));
  ce_rows_kernel<ELEMS><<<grid, kWarp * kRowsPerBlock, 0, stream>>>(logits, target, loss, row_scale, M, V, stride,
                                                                     ignore_index, write_grad);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sample_logits(const SampleLogitsArgs& a, cudaStream_t stream) {
  if (a.n_rows == 0) return cudaSuccess;
  const int64_t per_lane = (a.V + kWarp - 1) / kWarp;
  if (per_lane <= 1) return sample_for_elems<1>(a, stream);
  if (per_lane <= 2) return sample_for_elems<2>(a, stream);
  if (per_lane <= 4) return sample_for_elems<4>(a, stream);
  if (per_lane <= 8) return sample_for_elems<8>(a, stream);
  if (per_lane <= 16) return sample_for_elems<16>(a, stream);
  if (per_lane <= 32) return sample_for_elems<32>(a, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_ce_rows(float* logits, const int64_t* target, float* loss, const float* row_scale, int64_t M,
                           int64_t V, int64_t stride, int64_t ignore_index, bool write_grad, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const int64_t per_lane = (V + kWarp - 1) / kWarp;
#define FK_CE(E) return ce_for_elems<E>(logits, target, loss, row_scale, M, V, stride, ignore_index, write_grad, stream)
  if (per_lane <= 1) FK_CE(1);
  if (per_lane <= 2) FK_CE(2);
  if (per_lane <= 4) FK_CE(4);
  if (per_lane <= 8) FK_CE(8);
  if (per_lane <= 16) FK_CE(16);
  if (per_lane <= 32) FK_CE(32);
#undef FK_CE
  return cudaErrorInvalidValue;
}

}  // namespace fractal_kernels
