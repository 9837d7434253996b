// Tiny-sequence attention, forward and backward: softmax(q k^T * scale) v over millions of independent
// (sequence, head) pairs of L = 1..512 tokens, head dim D in {16, 32, 64, 80, 128}.
//
// Work decomposition. One *warp* is one independent worker that owns a 16-row tile of one (n, h) pair:
//   forward, dQ : 16 queries  [q0, q0+16), streaming the keys   in blocks of bn <= 64 rows;
//   dK / dV     : 16 keys     [j0, j0+16), streaming the queries in blocks of bn <= 64 rows.
// task = pair * ceil(L/16) + tile and pair = n * H + h, so a CTA of up to 4 warps packs the tiles of one
// or several pairs (at L <= 16 each warp is a whole pair), and the grid is 1-D over tasks (gridDim.x allows
// 2^31 - 1 CTAs, N*H ~ 1e7 needs ~ 1e7). Warps never wait for each other: there is no __syncthreads, only
// __syncwarp, and each warp has its own slice of dynamic shared memory. 16 rows per warp is the wmma tile
// height, and it keeps the padding waste small at the common L = 17..22 (two tiles).
//
// Per step a warp (1) copies the streamed block from global memory into shared memory with cp.async
// (16-byte chunks, zero-filled past the valid rows, so every tile is a whole multiple of 16 rows and
// nothing past the tensors is read; a plain element copy when a pointer or stride is not 16-byte aligned),
// (2) forms the fp32 score tile S[16, bn] = A B^T in shared memory, (3) applies mask / softmax row-wise
// (two lanes per row), writing P (or dS) in the operand type, and (4) accumulates acc[16, D] += P B2 in
// registers. The only two products are therefore "A B^T -> fp32 smem tile" and "acc += A B" on smem
// operands, implemented twice:
//   * fp16 / bf16: tensor cores through nvcuda::wmma 16x16x16 with fp32 accumulators (P and dS are
//     rounded to the input type before their product, as in flash attention);
//   * fp32: plain fp32 FMAs (no TF32), lane-owned output elements (see SimtOps).
// The forward uses an online softmax across key blocks (running max m and sum l per row, the accumulator
// rescaled by exp(m_old - m_new) only when some row's max moved); at L <= 64 there is one block.
// Backward (flash-attention style, P recomputed from the saved lse): kernel 1 computes delta = rowsum(dO*O)
// for its 16 queries, stores it in the fp32 workspace and accumulates dQ = scale * dS K; kernel 2 (after it
// on the same stream) accumulates dV = P^T dO and dK = scale * dS^T Q per 16 keys, reading delta.
// No atomics: each output row is owned by exactly one warp.
//
// Shared memory per warp (bytes, e = element size, ldE = D + 16/e, ldF = max(bn, D) + 4, ldP = bn + 16/e):
//   forward : Q 16*ldE*e + K, V 2*bn*ldE*e + S 16*ldF*4 + P 16*ldP*e + 512 row stats
//             e.g. bf16 D=64: 12.2 KB (L <= 16, bn=16), 17.2 KB (L <= 32, bn=32), 27.2 KB (bn=64);
//             fp32 D=128 (bn=32) 52.2 KB
//   backward: the above plus a second 16-row tile, a second fp32 tile and a second P-type tile
//             e.g. bf16 D=64 25.0 KB (bn=32), 36.0 KB (bn=64); fp32 D=128 (bn=32) 71.0 KB
// The launcher puts floor(96 KB / per-warp) (1..4) warps in a CTA and opts in to > 48 KB of dynamic shared
// memory with cudaFuncSetAttribute when needed (sm_80: 163 KB, sm_90: 227 KB per CTA at most).
// Row padding of 16 bytes (ldE, ldP) keeps the wmma / 16-byte accesses free of bank conflicts.
//
// Masking: key j is visible to query i iff j < len and (!causal or j <= i), len = seqlens[n] (or L).
// Queries i >= len get zero output, lse 0, zero dQ; keys j >= len get zero dK, dV. Scores, softmax and all
// sums are fp32 with expf / logf (no fast-math assumptions).
#include "tiny_attention_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fractal_kernels {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kTile = 16;                   // rows of a warp's tile; also the wmma M = N = K
constexpr int kMaxBlock = 64;               // most rows of a streamed block (bn)
constexpr int kMaxWarps = 4;                // warps per CTA
constexpr int kCtaSmemTarget = 96 * 1024;   // per-CTA shared memory the launcher aims at (2 CTAs / SM on sm_90)
constexpr int kDefaultSmemLimit = 48 * 1024;  // above this a kernel must opt in
constexpr int kRegionAlign = 128;           // every smem region starts 128-byte aligned (wmma needs 32)
constexpr int kChunkBytes = 16;             // cp.async / vector access granularity

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }

// ---- element conversions -------------------------------------------------------------------------------

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- per-warp shared memory layout ---------------------------------------------------------------------

// Byte offsets of one warp's regions; the same function sizes the launch (host) and carves smem (device).
struct WarpSmem {
  int a0, a1;         // [16, D] fixed tiles, ld lde: Q / dO (forward, dQ) or K / V (dK dV)
  int b0, b1;         // [bn, D] streamed blocks, ld lde: K / V (forward, dQ) or Q / dO (dK dV)
  int s, dp;          // [16, max(bn, D)] fp32, ld ldf: scores / dP; s also stages the accumulator
  int p, ds;          // [16, bn] operand type, ld ldp: P / dS
  int rows;           // 2 * kMaxBlock fp32 per-row values (alpha, 1/l, lse, delta, ...)
  int bytes;          // total, a multiple of kRegionAlign
  int lde, ldf, ldp;  // leading dimensions, in elements
};

__host__ __device__ inline int take_region(int& offset, int bytes) {
  const int at = offset;
  offset = round_up(offset + bytes, kRegionAlign);
  return at;
}

__host__ __device__ inline WarpSmem warp_smem(int D, int bn, int esize, bool backward) {
  WarpSmem w{};
  w.lde = D + kChunkBytes / esize;  // +16 bytes per row: rows start in different banks, rows stay 16B aligned
  w.ldf = imax(bn, D) + 4;          // fp32; ldm a multiple of 4 as wmma wants; holds the [16, D] accumulator
  w.ldp = bn + kChunkBytes / esize;
  int off = 0;
  w.a0 = take_region(off, kTile * w.lde * esize);
  w.a1 = backward ? take_region(off, kTile * w.lde * esize) : -1;
  w.b0 = take_region(off, bn * w.lde * esize);
  w.b1 = take_region(off, bn * w.lde * esize);
  w.s = take_region(off, kTile * w.ldf * 4);
  w.dp = backward ? take_region(off, kTile * w.ldf * 4) : -1;
  w.p = take_region(off, kTile * w.ldp * esize);
  w.ds = backward ? take_region(off, kTile * w.ldp * esize) : -1;
  w.rows = take_region(off, 2 * kMaxBlock * 4);
  w.bytes = off;
  return w;
}

// ---- global <-> shared copies -----------------------------------------------------------------------------

// 16-byte asynchronous copy global -> shared; live == false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool live) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const size_t src = __cvta_generic_to_global(gmem_src);
  const int src_bytes = live ? kChunkBytes : 0;  // bytes actually read; the rest of the 16 is zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
#else
  *static_cast<uint4*>(smem_dst) = live ? *static_cast<const uint4*>(gmem_src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// Waits for this thread's outstanding cp.async copies; a __syncwarp after it publishes them to the warp.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// smem rows [0, nrows) (ld elements apart) <- global rows [0, nvalid) of src (stride elements apart), rows
// [nvalid, nrows) zero. D elements per row. vec: src and stride are 16-byte aligned -> cp.async chunks
// (complete after cp_async_wait_all); else a synchronous element copy.
template <typename T, int D>
__device__ void stage_rows(T* dst, int ld, const T* src, int64_t stride, int nvalid, int nrows, bool vec,
                           int lane) {
  if (vec) {
    constexpr int kVec = kChunkBytes / sizeof(T);
    constexpr int kChunks = D / kVec;  // D is a multiple of 16, so rows are whole chunks
#pragma unroll 1
    for (int idx = lane; idx < nrows * kChunks; idx += kWarp) {
      const int r = idx / kChunks, c = (idx % kChunks) * kVec;
      const bool live = r < nvalid;
      cp_async_16(dst + r * ld + c, live ? src + r * stride + c : src, live);
    }
  } else {
#pragma unroll 1
    for (int idx = lane; idx < nrows * D; idx += kWarp) {
      const int r = idx / D, c = idx % D;
      dst[r * ld + c] = r < nvalid ? src[r * stride + c] : from_float<T>(0.f);
    }
  }
}

// global rows [0, nrows) of dst <- fp32 smem rows times row_scale[r] for r < nnz, zeros for r in [nnz, nrows).
template <typename T, int D>
__device__ void write_rows(T* dst, int64_t stride, const float* src, int ld, const float* row_scale, int nnz,
                           int nrows, bool vec, int lane) {
  constexpr int kVec = kChunkBytes / sizeof(T);
  if (vec) {
    constexpr int kChunks = D / kVec;
#pragma unroll 1
    for (int idx = lane; idx < nrows * kChunks; idx += kWarp) {
      const int r = idx / kChunks, c = (idx % kChunks) * kVec;
      union { uint4 u; T e[kVec]; } out;
      const bool live = r < nnz;
      const float sc = live ? row_scale[r] : 0.f;
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.e[e] = from_float<T>(live ? src[r * ld + c + e] * sc : 0.f);
      *reinterpret_cast<uint4*>(dst + r * stride + c) = out.u;
    }
  } else {
#pragma unroll 1
    for (int idx = lane; idx < nrows * D; idx += kWarp) {
      const int r = idx / D, c = idx % D;
      dst[r * stride + c] = from_float<T>(r < nnz ? src[r * ld + c] * row_scale[r] : 0.f);
    }
  }
}

// ---- the two warp-level products ---------------------------------------------------------------------------
// abt : S[16, ncols] (fp32 smem, ld lds) = A[16, D] * B[ncols, D]^T       (A, B smem, operand type)
// ab  : acc[16, D] += A[16, nk] * B[nk, D]                                (A, B smem; acc in registers)
// ncols, nk: multiples of 16, <= kMaxBlock. Rows of B past the valid data are zero in smem.

// fp16 / bf16: tensor cores. Accumulator fragments are opaque, so row-wise operations go through smem.
template <typename T, int D>
struct TensorCoreOps {
  using Elem = T;
  using FragAcc = wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float>;
  struct Acc { FragAcc f[D / kTile]; };  // column tiles of the [16, D] accumulator

  static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int j = 0; j < D / kTile; ++j) wmma::fill_fragment(acc.f[j], 0.f);
  }

  static __device__ __forceinline__ void abt(float* S, int lds, const T* A, int lda, const T* B, int ldb,
                                             int ncols, int /*lane*/) {
#pragma unroll 1
    for (int t = 0; t < ncols / kTile; ++t) {
      FragAcc c;
      wmma::fill_fragment(c, 0.f);
#pragma unroll
      for (int k = 0; k < D; k += kTile) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
        // B^T as a col-major [D, ncols] matrix: element (k, n) = B[n][k] at B + n*ldb + k
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, A + k, lda);
        wmma::load_matrix_sync(b, B + t * kTile * ldb + k, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(S + t * kTile, c, lds, wmma::mem_row_major);
    }
  }

  static __device__ __forceinline__ void ab(Acc& acc, const T* A, int lda, const T* B, int ldb, int nk,
                                            int /*lane*/) {
#pragma unroll 1
    for (int k = 0; k < nk; k += kTile) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, A + k, lda);
#pragma unroll
      for (int j = 0; j < D / kTile; ++j) {
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, B + k * ldb + j * kTile, ldb);
        wmma::mma_sync(acc.f[j], a, b, acc.f[j]);
      }
    }
  }

  // acc -> fp32 smem [16, D] (ld). Call __syncwarp before other lanes read it.
  static __device__ __forceinline__ void store(const Acc& acc, float* dst, int ld, int /*lane*/) {
#pragma unroll
    for (int j = 0; j < D / kTile; ++j) wmma::store_matrix_sync(dst + j * kTile, acc.f[j], ld, wmma::mem_row_major);
  }

  // acc row r *= alpha[r] (alpha in smem): through the staging buffer, as the fragment layout is opaque.
  static __device__ __forceinline__ void scale_rows(Acc& acc, const float* alpha, float* stage, int ld, int lane) {
    store(acc, stage, ld, lane);
    __syncwarp();
#pragma unroll 1
    for (int idx = lane; idx < kTile * D; idx += kWarp) {
      const int r = idx / D, c = idx % D;
      stage[r * ld + c] *= alpha[r];
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < D / kTile; ++j)
      wmma::load_matrix_sync(acc.f[j], stage + j * kTile, ld, wmma::mem_row_major);
    __syncwarp();  // the staging buffer is overwritten next by the next block's scores
  }
};

// fp32: SIMT FMAs on fp32 smem operands. Accumulator ownership: lane owns rows 8*(lane/16) + i (i < 8) and
// columns (lane%16) + 16*j (j < D/16), D/2 floats: B rows are read as 16 consecutive words per half-warp
// (conflict-free, broadcast across the halves), A as float4 broadcasts.
template <int D>
struct SimtOps {
  using Elem = float;
  static constexpr int kRowsPerLane = kTile / 2;
  static constexpr int kColsPerLane = D / kTile;
  struct Acc { float v[kRowsPerLane][kColsPerLane]; };

  static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) acc.v[i][j] = 0.f;
  }

  // Lane owns score column c = c0 + lane and all 16 rows. B[c] is read as float4 along the row: with ldb/4
  // odd (ldb = D + 4, D a multiple of 16) the 8 lanes of each 128-bit phase hit distinct banks.
  static __device__ __forceinline__ void abt(float* S, int lds, const float* A, int lda, const float* B, int ldb,
                                             int ncols, int lane) {
#pragma unroll 1
    for (int c0 = 0; c0 < ncols; c0 += kWarp) {
      const int c = c0 + lane;
      if (c < ncols) {
        float s[kTile];
#pragma unroll
        for (int r = 0; r < kTile; ++r) s[r] = 0.f;
        const float* brow = B + c * ldb;
#pragma unroll 2
        for (int d = 0; d < D; d += 4) {
          const float4 b = *reinterpret_cast<const float4*>(brow + d);
#pragma unroll
          for (int r = 0; r < kTile; ++r) {
            const float4 a = *reinterpret_cast<const float4*>(A + r * lda + d);
            s[r] = fmaf(a.x, b.x, s[r]);
            s[r] = fmaf(a.y, b.y, s[r]);
            s[r] = fmaf(a.z, b.z, s[r]);
            s[r] = fmaf(a.w, b.w, s[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < kTile; ++r) S[r * lds + c] = s[r];
      }
    }
  }

  static __device__ __forceinline__ void ab(Acc& acc, const float* A, int lda, const float* B, int ldb, int nk,
                                            int lane) {
    const int r0 = (lane / kTile) * kRowsPerLane, c0 = lane % kTile;
#pragma unroll 1
    for (int k = 0; k < nk; k += 4) {
      float4 a[kRowsPerLane];
#pragma unroll
      for (int i = 0; i < kRowsPerLane; ++i) a[i] = *reinterpret_cast<const float4*>(A + (r0 + i) * lda + k);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) {
          const float b = B[(k + kk) * ldb + c0 + j * kTile];
#pragma unroll
          for (int i = 0; i < kRowsPerLane; ++i) {
            const float av = kk == 0 ? a[i].x : kk == 1 ? a[i].y : kk == 2 ? a[i].z : a[i].w;
            acc.v[i][j] = fmaf(av, b, acc.v[i][j]);
          }
        }
      }
    }
  }

  static __device__ __forceinline__ void store(const Acc& acc, float* dst, int ld, int lane) {
    const int r0 = (lane / kTile) * kRowsPerLane, c0 = lane % kTile;
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) dst[(r0 + i) * ld + c0 + j * kTile] = acc.v[i][j];
  }

  static __device__ __forceinline__ void scale_rows(Acc& acc, const float* alpha, float* /*stage*/, int /*ld*/,
                                                    int lane) {
    const int r0 = (lane / kTile) * kRowsPerLane;
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
      const float s = alpha[r0 + i];
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) acc.v[i][j] *= s;
    }
  }
};

template <typename T, int D>
using OpsFor = typename std::conditional<std::is_same<T, float>::value, SimtOps<D>, TensorCoreOps<T, D>>::type;

// ---- kernel parameters ------------------------------------------------------------------------------------

struct Operand {  // device view of an AttnTensor
  const void* data;
  int64_t sn, sh, sl;
};

template <typename T>
__device__ __forceinline__ T* row_ptr(const Operand& t, int n, int h, int row) {
  return const_cast<T*>(static_cast<const T*>(t.data)) + n * t.sn + h * t.sh + static_cast<int64_t>(row) * t.sl;
}

struct Params {
  Operand q, k, v, o, dout, dq, dk, dv;
  float* lse;          // [N, H, L]
  float* delta;        // [N, H, L] (backward)
  const int* seqlens;  // nullable
  int64_t num_tasks;   // N * H * tiles
  int H, L, tiles, bn;
  float scale;
  bool causal;
  bool vec_in;         // every read operand is 16-byte aligned (pointer and strides)
  bool vec_out;        // every written [N, H, L, D] operand is 16-byte aligned
};

struct TaskInfo {
  int64_t pair;  // n * H + h: index into lse / delta rows
  int n, h;
  int row0;      // first row of this warp's 16-row tile
  int len;       // valid tokens of sequence n
  int nrows;     // rows of the tile inside [0, L)
  int nvalid;    // rows of the tile inside [0, len)
};

__device__ __forceinline__ TaskInfo decode_task(const Params& p, int64_t task) {
  TaskInfo t;
  t.pair = task / p.tiles;
  t.row0 = static_cast<int>(task % p.tiles) * kTile;
  t.n = static_cast<int>(t.pair / p.H);
  t.h = static_cast<int>(t.pair % p.H);
  int len = p.seqlens != nullptr ? p.seqlens[t.n] : p.L;
  t.len = len < 0 ? 0 : (len > p.L ? p.L : len);
  t.nrows = imin(kTile, p.L - t.row0);
  t.nvalid = imax(0, imin(kTile, t.len - t.row0));
  return t;
}

// ---- forward ------------------------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps * kWarp) tiny_attention_fwd_kernel(const Params p) {
  using Ops = OpsFor<T, D>;
  extern __shared__ __align__(kRegionAlign) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (task >= p.num_tasks) return;  // warp-uniform exit: warps never synchronise with each other

  const WarpSmem lay = warp_smem(D, p.bn, sizeof(T), false);
  unsigned char* base = smem_raw + static_cast<size_t>(warp) * lay.bytes;
  T* sQ = reinterpret_cast<T*>(base + lay.a0);  // [16, D]
  T* sK = reinterpret_cast<T*>(base + lay.b0);  // [bn, D]
  T* sV = reinterpret_cast<T*>(base + lay.b1);  // [bn, D]
  float* sS = reinterpret_cast<float*>(base + lay.s);  // [16, bn] scores, then the [16, D] output
  T* sP = reinterpret_cast<T*>(base + lay.p);  // [16, bn] probabilities
  float* sRow = reinterpret_cast<float*>(base + lay.rows);  // [16] alpha per block, then 1/l

  const TaskInfo t = decode_task(p, task);
  const int q0 = t.row0;
  T* o_tile = row_ptr<T>(p.o, t.n, t.h, q0);
  if (t.nvalid == 0) {  // queries past the sequence length: zero output, lse 0
    write_rows<T, D>(o_tile, p.o.sl, nullptr, 0, nullptr, 0, t.nrows, p.vec_out, lane);
    if (lane < t.nrows) p.lse[t.pair * p.L + q0 + lane] = 0.f;
    return;
  }
  stage_rows<T, D>(sQ, lay.lde, row_ptr<T>(p.q, t.n, t.h, q0), p.q.sl, t.nvalid, kTile, p.vec_in, lane);

  // Two lanes per query row: lane 2r and 2r+1 own row r, interleaved columns c = half + 2i.
  const int r = lane >> 1, half = lane & 1;
  const int qi = q0 + r;
  const int kvis = p.causal ? imin(t.len, qi + 1) : t.len;    // keys [0, kvis) visible to row r
  const int kend = p.causal ? imin(t.len, q0 + kTile) : t.len;  // keys any row of the tile sees
  float m_run = -INFINITY, l_run = 0.f;                        // running max / sum of exp (scaled scores)
  typename Ops::Acc acc;
  Ops::zero(acc);

#pragma unroll 1
  for (int k0 = 0; k0 < kend; k0 += p.bn) {
    const int nk = imin(p.bn, kend - k0);
    const int ncols = round_up(nk, kTile);
    stage_rows<T, D>(sK, lay.lde, row_ptr<T>(p.k, t.n, t.h, k0), p.k.sl, nk, ncols, p.vec_in, lane);
    stage_rows<T, D>(sV, lay.lde, row_ptr<T>(p.v, t.n, t.h, k0), p.v.sl, nk, ncols, p.vec_in, lane);
    cp_async_wait_all();
    __syncwarp();

    Ops::abt(sS, lay.ldf, sQ, lay.lde, sK, lay.lde, ncols, lane);  // S = Q K^T  [16, ncols]
    __syncwarp();

    // online softmax over this block
    const float* srow = sS + r * lay.ldf;
    float bmax = -INFINITY;
#pragma unroll 1
    for (int c = half; c < ncols; c += 2)
      if (k0 + c < kvis) bmax = fmaxf(bmax, srow[c] * p.scale);
    bmax = fmaxf(bmax, __shfl_xor_sync(kFull, bmax, 1));
    const float m_new = fmaxf(m_run, bmax);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // row with nothing visible yet: avoid inf - inf
    const float alpha = expf(m_run - m_use);                // 0 on the first visible block
    float bsum = 0.f;
    T* prow = sP + r * lay.ldp;
#pragma unroll 1
    for (int c = half; c < ncols; c += 2) {
      const float pv = (k0 + c < kvis) ? expf(srow[c] * p.scale - m_use) : 0.f;
      bsum += pv;
      prow[c] = from_float<T>(pv);
    }
    bsum += __shfl_xor_sync(kFull, bsum, 1);
    l_run = l_run * alpha + bsum;
    m_run = m_new;
    if (half == 0) sRow[r] = alpha;
    __syncwarp();

    if (k0 > 0 && __any_sync(kFull, alpha != 1.f)) Ops::scale_rows(acc, sRow, sS, lay.ldf, lane);
    Ops::ab(acc, sP, lay.ldp, sV, lay.lde, ncols, lane);  // O += P V
    __syncwarp();  // before the next block overwrites sK, sV, sS, sP
  }

  if (half == 0) {
    const bool live = r < t.nvalid && l_run > 0.f;
    sRow[r] = live ? 1.f / l_run : 0.f;
    if (r < t.nrows) p.lse[t.pair * p.L + qi] = live ? m_run + logf(l_run) : 0.f;
  }
  Ops::store(acc, sS, lay.ldf, lane);
  __syncwarp();
  write_rows<T, D>(o_tile, p.o.sl, sS, lay.ldf, sRow, t.nvalid, t.nrows, p.vec_out, lane);
}

// ---- backward, kernel 1: delta and dQ per 16 queries ---------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps * kWarp) tiny_attention_bwd_dq_kernel(const Params p) {
  using Ops = OpsFor<T, D>;
  extern __shared__ __align__(kRegionAlign) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (task >= p.num_tasks) return;

  const WarpSmem lay = warp_smem(D, p.bn, sizeof(T), true);
  unsigned char* base = smem_raw + static_cast<size_t>(warp) * lay.bytes;
  T* sQ = reinterpret_cast<T*>(base + lay.a0);     // [16, D]
  T* sDO = reinterpret_cast<T*>(base + lay.a1);    // [16, D]
  T* sK = reinterpret_cast<T*>(base + lay.b0);     // [bn, D]
  T* sV = reinterpret_cast<T*>(base + lay.b1);     // [bn, D]
  float* sS = reinterpret_cast<float*>(base + lay.s);    // [16, bn] scores, then the [16, D] dQ
  float* sDP = reinterpret_cast<float*>(base + lay.dp);  // [16, bn] dP = dO V^T
  T* sDS = reinterpret_cast<T*>(base + lay.ds);    // [16, bn] dS
  float* sRow = reinterpret_cast<float*>(base + lay.rows);  // [16] output row scale

  const TaskInfo t = decode_task(p, task);
  const int q0 = t.row0;
  T* dq_tile = row_ptr<T>(p.dq, t.n, t.h, q0);
  float* delta_rows = p.delta + t.pair * p.L + q0;
  if (t.nvalid == 0) {
    write_rows<T, D>(dq_tile, p.dq.sl, nullptr, 0, nullptr, 0, t.nrows, p.vec_out, lane);
    if (lane < t.nrows) delta_rows[lane] = 0.f;
    return;
  }
  stage_rows<T, D>(sQ, lay.lde, row_ptr<T>(p.q, t.n, t.h, q0), p.q.sl, t.nvalid, kTile, p.vec_in, lane);
  stage_rows<T, D>(sDO, lay.lde, row_ptr<T>(p.dout, t.n, t.h, q0), p.dout.sl, t.nvalid, kTile, p.vec_in, lane);
  cp_async_wait_all();
  __syncwarp();

  const int r = lane >> 1, half = lane & 1;
  const int qi = q0 + r;
  const bool row_live = r < t.nvalid;
  // delta_r = sum_d dO[r, d] * O[r, d] (fp32), O read straight from global memory (used once)
  float delta = 0.f;
  if (row_live) {
    const T* orow = row_ptr<T>(p.o, t.n, t.h, qi);
#pragma unroll 1
    for (int d = half; d < D; d += 2) delta = fmaf(to_float(sDO[r * lay.lde + d]), to_float(orow[d]), delta);
  }
  delta += __shfl_xor_sync(kFull, delta, 1);
  const float lse = row_live ? p.lse[t.pair * p.L + qi] : 0.f;
  if (half == 0 && r < t.nrows) delta_rows[r] = delta;  // 0 for rows >= len

  const int kvis = p.causal ? imin(t.len, qi + 1) : t.len;
  const int kend = p.causal ? imin(t.len, q0 + kTile) : t.len;
  typename Ops::Acc acc;
  Ops::zero(acc);
#pragma unroll 1
  for (int k0 = 0; k0 < kend; k0 += p.bn) {
    const int nk = imin(p.bn, kend - k0);
    const int ncols = round_up(nk, kTile);
    stage_rows<T, D>(sK, lay.lde, row_ptr<T>(p.k, t.n, t.h, k0), p.k.sl, nk, ncols, p.vec_in, lane);
    stage_rows<T, D>(sV, lay.lde, row_ptr<T>(p.v, t.n, t.h, k0), p.v.sl, nk, ncols, p.vec_in, lane);
    cp_async_wait_all();
    __syncwarp();

    Ops::abt(sS, lay.ldf, sQ, lay.lde, sK, lay.lde, ncols, lane);    // S  = Q K^T
    Ops::abt(sDP, lay.ldf, sDO, lay.lde, sV, lay.lde, ncols, lane);  // dP = dO V^T
    __syncwarp();

    // dS = P * (dP - delta), P = exp(S * scale - lse); zero where masked and on rows >= len
#pragma unroll 1
    for (int c = half; c < ncols; c += 2) {
      const bool vis = row_live && k0 + c < kvis;
      const float pv = vis ? expf(sS[r * lay.ldf + c] * p.scale - lse) : 0.f;
      sDS[r * lay.ldp + c] = from_float<T>(vis ? pv * (sDP[r * lay.ldf + c] - delta) : 0.f);
    }
    __syncwarp();
    Ops::ab(acc, sDS, lay.ldp, sK, lay.lde, ncols, lane);  // dQ += dS K
    __syncwarp();
  }

  if (half == 0) sRow[r] = p.scale;
  Ops::store(acc, sS, lay.ldf, lane);
  __syncwarp();
  write_rows<T, D>(dq_tile, p.dq.sl, sS, lay.ldf, sRow, t.nvalid, t.nrows, p.vec_out, lane);
}

// ---- backward, kernel 2: dK and dV per 16 keys ------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kMaxWarps * kWarp) tiny_attention_bwd_dkdv_kernel(const Params p) {
  using Ops = OpsFor<T, D>;
  extern __shared__ __align__(kRegionAlign) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (task >= p.num_tasks) return;

  const WarpSmem lay = warp_smem(D, p.bn, sizeof(T), true);
  unsigned char* base = smem_raw + static_cast<size_t>(warp) * lay.bytes;
  T* sK = reinterpret_cast<T*>(base + lay.a0);     // [16, D] this warp's keys
  T* sV = reinterpret_cast<T*>(base + lay.a1);     // [16, D]
  T* sQ = reinterpret_cast<T*>(base + lay.b0);     // [bn, D] streamed queries
  T* sDO = reinterpret_cast<T*>(base + lay.b1);    // [bn, D]
  float* sS = reinterpret_cast<float*>(base + lay.s);    // [16, bn] S^T = K Q^T, then the outputs
  float* sDP = reinterpret_cast<float*>(base + lay.dp);  // [16, bn] dP^T = V dO^T
  T* sP = reinterpret_cast<T*>(base + lay.p);      // [16, bn] P^T
  T* sDS = reinterpret_cast<T*>(base + lay.ds);    // [16, bn] dS^T
  float* sLse = reinterpret_cast<float*>(base + lay.rows);  // [bn] lse of the streamed queries
  float* sDelta = sLse + kMaxBlock;                         // [bn] delta of the streamed queries

  const TaskInfo t = decode_task(p, task);
  const int j0 = t.row0;
  T* dk_tile = row_ptr<T>(p.dk, t.n, t.h, j0);
  T* dv_tile = row_ptr<T>(p.dv, t.n, t.h, j0);
  if (t.nvalid == 0) {  // keys past the sequence length: zero gradients
    write_rows<T, D>(dk_tile, p.dk.sl, nullptr, 0, nullptr, 0, t.nrows, p.vec_out, lane);
    write_rows<T, D>(dv_tile, p.dv.sl, nullptr, 0, nullptr, 0, t.nrows, p.vec_out, lane);
    return;
  }
  stage_rows<T, D>(sK, lay.lde, row_ptr<T>(p.k, t.n, t.h, j0), p.k.sl, t.nvalid, kTile, p.vec_in, lane);
  stage_rows<T, D>(sV, lay.lde, row_ptr<T>(p.v, t.n, t.h, j0), p.v.sl, t.nvalid, kTile, p.vec_in, lane);

  const int r = lane >> 1, half = lane & 1;
  const int kj = j0 + r;              // this lane's key
  const bool key_live = r < t.nvalid;
  const int istart = p.causal ? j0 : 0;  // queries before j0 see none of these keys
  const float* lse_rows = p.lse + t.pair * p.L;
  const float* delta_rows = p.delta + t.pair * p.L;
  typename Ops::Acc dk, dv;
  Ops::zero(dk);
  Ops::zero(dv);

#pragma unroll 1
  for (int i0 = istart; i0 < t.len; i0 += p.bn) {
    const int nq = imin(p.bn, t.len - i0);
    const int ncols = round_up(nq, kTile);
    stage_rows<T, D>(sQ, lay.lde, row_ptr<T>(p.q, t.n, t.h, i0), p.q.sl, nq, ncols, p.vec_in, lane);
    stage_rows<T, D>(sDO, lay.lde, row_ptr<T>(p.dout, t.n, t.h, i0), p.dout.sl, nq, ncols, p.vec_in, lane);
    for (int c = lane; c < ncols; c += kWarp) {
      sLse[c] = c < nq ? lse_rows[i0 + c] : 0.f;
      sDelta[c] = c < nq ? delta_rows[i0 + c] : 0.f;
    }
    cp_async_wait_all();
    __syncwarp();

    Ops::abt(sS, lay.ldf, sK, lay.lde, sQ, lay.lde, ncols, lane);    // S^T  = K Q^T   [16 keys, ncols queries]
    Ops::abt(sDP, lay.ldf, sV, lay.lde, sDO, lay.lde, ncols, lane);  // dP^T = V dO^T
    __syncwarp();

#pragma unroll 1
    for (int c = half; c < ncols; c += 2) {
      const int qi = i0 + c;
      const bool vis = key_live && c < nq && (!p.causal || kj <= qi);
      const float pv = vis ? expf(sS[r * lay.ldf + c] * p.scale - sLse[c]) : 0.f;
      sP[r * lay.ldp + c] = from_float<T>(pv);
      sDS[r * lay.ldp + c] = from_float<T>(vis ? pv * (sDP[r * lay.ldf + c] - sDelta[c]) : 0.f);
    }
    __syncwarp();
    Ops::ab(dv, sP, lay.ldp, sDO, lay.lde, ncols, lane);  // dV += P^T dO
    Ops::ab(dk, sDS, lay.ldp, sQ, lay.lde, ncols, lane);  // dK += dS^T Q
    __syncwarp();
  }

  // outputs through the staging tile; row scale 1 for dV, scale for dK (sLse is free now)
  float* sScale = sLse;
  if (half == 0) sScale[r] = 1.f;
  Ops::store(dv, sS, lay.ldf, lane);
  __syncwarp();
  write_rows<T, D>(dv_tile, p.dv.sl, sS, lay.ldf, sScale, t.nvalid, t.nrows, p.vec_out, lane);
  __syncwarp();
  if (half == 0) sScale[r] = p.scale;
  Ops::store(dk, sS, lay.ldf, lane);
  __syncwarp();
  write_rows<T, D>(dk_tile, p.dk.sl, sS, lay.ldf, sScale, t.nvalid, t.nrows, p.vec_out, lane);
}

// ---- launch ---------------------------------------------------------------------------------------------------

Operand operand_of(const AttnTensor& t) { return Operand{t.data, t.stride_n, t.stride_h, t.stride_l}; }

int element_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// 16-byte aligned base pointer and strides (strides of size-1 dimensions never matter).
bool aligned16(const AttnTensor& t, int64_t N, int64_t H, int64_t L, int esize) {
  if (reinterpret_cast<uintptr_t>(t.data) % kChunkBytes != 0) return false;
  const auto ok = [esize](int64_t stride, int64_t size) { return size <= 1 || (stride * esize) % kChunkBytes == 0; };
  return ok(t.stride_n, N) && ok(t.stride_h, H) && ok(t.stride_l, L);
}

// Rows of a streamed block: no more than the (16-padded) sequence needs; fp32 with wide heads uses 32 so
// that a warp's slice stays within the 96 KB CTA target.
int pick_block(int64_t L, int64_t D, int esize) {
  int bn = L <= 16 ? 16 : (L <= 32 ? 32 : kMaxBlock);
  if (esize == 4 && D >= 64) bn = imin(bn, 32);
  return bn;
}

using KernelFn = void (*)(const Params);

cudaError_t launch(KernelFn kernel, const Params& p, int per_warp_bytes, cudaStream_t stream) {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  int warps = imax(1, imin(kMaxWarps, kCtaSmemTarget / per_warp_bytes));
  while (warps > 1 && warps * per_warp_bytes > optin) --warps;
  const int smem = warps * per_warp_bytes;
  if (smem > optin) return cudaErrorInvalidConfiguration;
  if (smem > kDefaultSmemLimit) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = (p.num_tasks + warps - 1) / warps;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), warps * kWarp, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t run_fwd(const Params& p, cudaStream_t stream) {
  const WarpSmem lay = warp_smem(D, p.bn, sizeof(T), false);
  return launch(tiny_attention_fwd_kernel<T, D>, p, lay.bytes, stream);
}

template <typename T, int D>
cudaError_t run_bwd(const Params& p, cudaStream_t stream) {
  const WarpSmem lay = warp_smem(D, p.bn, sizeof(T), true);
  const cudaError_t err = launch(tiny_attention_bwd_dq_kernel<T, D>, p, lay.bytes, stream);  // writes delta
  if (err != cudaSuccess) return err;
  return launch(tiny_attention_bwd_dkdv_kernel<T, D>, p, lay.bytes, stream);  // reads delta
}

// (dtype, D) -> run<T, D>(p, stream)
template <template <typename, int> class Runner>
cudaError_t dispatch(DType dtype, int64_t D, const Params& p, cudaStream_t stream) {
  switch (dtype) {
#define FK_ATTN_HEAD_DIMS(T)                                      \
  switch (D) {                                                    \
    case 16: return Runner<T, 16>::run(p, stream);                \
    case 32: return Runner<T, 32>::run(p, stream);                \
    case 64: return Runner<T, 64>::run(p, stream);                \
    case 80: return Runner<T, 80>::run(p, stream);                \
    case 128: return Runner<T, 128>::run(p, stream);              \
    default: return cudaErrorInvalidValue;                        \
  }
    case DType::kFloat32: FK_ATTN_HEAD_DIMS(float)
    case DType::kFloat16: FK_ATTN_HEAD_DIMS(__half)
    case DType::kBFloat16: FK_ATTN_HEAD_DIMS(__nv_bfloat16)
#undef FK_ATTN_HEAD_DIMS
  }
  return cudaErrorInvalidValue;
}

template <typename T, int D> struct FwdRunner { static cudaError_t run(const Params& p, cudaStream_t s) { return run_fwd<T, D>(p, s); } };
template <typename T, int D> struct BwdRunner { static cudaError_t run(const Params& p, cudaStream_t s) { return run_bwd<T, D>(p, s); } };

bool valid_shape(int64_t N, int64_t H, int64_t L, int64_t D) {
  return N >= 0 && H >= 0 && L >= 1 && L <= kTinyAttentionMaxLen && tiny_attention_supports_head_dim(D) &&
         N * H <= 0x7fffffffLL;
}

Params base_params(int64_t N, int64_t H, int64_t L, int64_t D, DType dtype, const int* seqlens, bool causal,
                   float scale) {
  Params p{};
  p.seqlens = seqlens;
  p.H = static_cast<int>(H);
  p.L = static_cast<int>(L);
  p.tiles = static_cast<int>((L + kTile - 1) / kTile);
  p.num_tasks = N * H * p.tiles;
  p.bn = pick_block(L, D, element_size(dtype));
  p.scale = scale;
  p.causal = causal;
  return p;
}

}  // namespace

cudaError_t launch_tiny_attention_fwd(const TinyAttentionFwdArgs& a, cudaStream_t stream) {
  if (!valid_shape(a.N, a.H, a.L, a.D)) return cudaErrorInvalidValue;
  if (a.N * a.H == 0) return cudaSuccess;
  Params p = base_params(a.N, a.H, a.L, a.D, a.dtype, a.seqlens, a.causal, a.scale);
  p.q = operand_of(a.q);
  p.k = operand_of(a.k);
  p.v = operand_of(a.v);
  p.o = operand_of(a.o);
  p.lse = a.lse;
  const int es = element_size(a.dtype);
  p.vec_in = aligned16(a.q, a.N, a.H, a.L, es) && aligned16(a.k, a.N, a.H, a.L, es) &&
             aligned16(a.v, a.N, a.H, a.L, es);
  p.vec_out = aligned16(a.o, a.N, a.H, a.L, es);
  return dispatch<FwdRunner>(a.dtype, a.D, p, stream);
}

cudaError_t launch_tiny_attention_bwd(const TinyAttentionBwdArgs& a, cudaStream_t stream) {
  if (!valid_shape(a.N, a.H, a.L, a.D)) return cudaErrorInvalidValue;
  if (a.N * a.H == 0) return cudaSuccess;
  Params p = base_params(a.N, a.H, a.L, a.D, a.dtype, a.seqlens, a.causal, a.scale);
  p.q = operand_of(a.q);
  p.k = operand_of(a.k);
  p.v = operand_of(a.v);
  p.o = operand_of(a.o);
  p.dout = operand_of(a.dout);
  p.dq = operand_of(a.dq);
  p.dk = operand_of(a.dk);
  p.dv = operand_of(a.dv);
  p.lse = const_cast<float*>(a.lse);
  p.delta = a.delta;
  const int es = element_size(a.dtype);
  // o is read element-wise (delta), so only the cp.async-staged operands decide vec_in
  p.vec_in = aligned16(a.q, a.N, a.H, a.L, es) && aligned16(a.k, a.N, a.H, a.L, es) &&
             aligned16(a.v, a.N, a.H, a.L, es) && aligned16(a.dout, a.N, a.H, a.L, es);
  p.vec_out = aligned16(a.dq, a.N, a.H, a.L, es) && aligned16(a.dk, a.N, a.H, a.L, es) &&
              aligned16(a.dv, a.N, a.H, a.L, es);
  return dispatch<BwdRunner>(a.dtype, a.D, p, stream);
}

}  // namespace fractal_kernels
