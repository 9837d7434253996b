// Fused pixel head on the CPU: FractalGen's whole pixel (R, G, B, both CFG halves, the sampler) in one call.
//
// The CPU twin of the Triton kernel in fractal_kernels/ops/pixel_head/kernels.py, for the same reason: done with
// PyTorch ops a pixel-head call is ~100 dispatches of tensors far too small to amortise them (a pixel is a
// few thousand FLOPs). Here a tile of 16 pixels (their cond and uncond rows) goes through the 4-token causal
// transformer with a KV cache (channel c runs token c only), each weight matrix read once per tile, then each
// pixel's sampler, then the next token.
//
// Plain C ABI, no torch headers: the library builds with one compiler call in about a second and is loaded
// with ctypes (fractal_kernels/cpu/__init__.py). The caller validates shapes, dtypes and contiguity; all
// tensors are contiguous fp32 except `uniforms` (fp64) and the outputs.
//
// Numerics: fp32 math as the reference (fractal_kernels/reference/pixel_head.py); dot products are summed in
// another order than BLAS, so logits agree to ~1e-6, not bit for bit. Randomness: explicit uniforms or
// Philox (inverse-CDF, the op's draw), or Exp(1) noise (argmax of p / e, torch.multinomial's algorithm).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int V = 256;
constexpr float LN_EPS = 1e-6f;

enum Draw { DRAW_UNIFORMS = 0, DRAW_PHILOX = 1, DRAW_EXPONENTIALS = 2, DRAW_GREEDY = 3 };

struct Weights {  // the PixelHeadWeights fields, in order, then the six matrices transposed to [K, N]
  const float *cond_w, *cond_b, *codebooks, *mlm_bias, *ln_w, *ln_b, *norm1_w, *norm1_b, *qkv_w, *qkv_b, *proj_w,
      *proj_b, *norm2_w, *norm2_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b, *norm_w, *norm_b;
  const float *cond_t, *codebooks_t, *qkv_t, *proj_t, *fc1_t, *fc2_t;  // [C, W] [3, W, 256] [D, W, 3W] ...
};

constexpr int TILE = 16;  // pixels per tile: their activations stay in L1/L2 while the weights stream once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// AVX2 + FMA where the CPU has it (chosen at load time), SSE2 otherwise: same loop, twice the width
#define FK_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FK_CLONES
#endif

// Y[r, n] = b[n] + sum_k X[r, k] wt[k, n] for `rows` rows (row strides ldx, ldy in floats), the weight
// transposed to [K, N]. The inner loop runs over the outputs, contiguous and independent, so it vectorises
// (the widths here are far too small for a dot product's horizontal sums to pay); weight row k serves every
// row of the tile while it sits in L1, so a tile reads each weight once; k runs in order in every build.
typedef float v8f __attribute__((vector_size(32)));  // GCC/Clang vector extension: AVX2 or 2 x SSE2

FK_CLONES void linear_rows(const float* __restrict wt, const float* __restrict b, const float* __restrict x,
                           int64_t ldx, float* __restrict y, int64_t ldy, int rows, int n_out, int k_in) {
  // 4 rows x 16 outputs of accumulators stay in registers across k (a load and store of y per FMA would
  // bound the loop); rows are rounded up to 4: the caller's buffers have room, the extra rows are scratch
  const int n_main = n_out / 16 * 16;
  for (int r0 = 0; r0 < rows; r0 += 4) {
    const float* x0 = x + r0 * ldx;
    for (int n0 = 0; n0 < n_main; n0 += 16) {
      v8f a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
      for (int k = 0; k < k_in; ++k) {
        const float* wr = wt + static_cast<int64_t>(k) * n_out + n0;
        v8f w0, w1;  // unaligned loads
        std::memcpy(&w0, wr, sizeof(w0));
        std::memcpy(&w1, wr + 8, sizeof(w1));
        const float x_0 = x0[k], x_1 = x0[ldx + k], x_2 = x0[2 * ldx + k], x_3 = x0[3 * ldx + k];
        a00 += x_0 * w0; a01 += x_0 * w1;
        a10 += x_1 * w0; a11 += x_1 * w1;
        a20 += x_2 * w0; a21 += x_2 * w1;
        a30 += x_3 * w0; a31 += x_3 * w1;
      }
      v8f b0, b1;
      std::memcpy(&b0, b + n0, sizeof(b0));
      std::memcpy(&b1, b + n0 + 8, sizeof(b1));
      const v8f out[8] = {a00 + b0, a01 + b1, a10 + b0, a11 + b1, a20 + b0, a21 + b1, a30 + b0, a31 + b1};
      for (int i = 0; i < 4; ++i) std::memcpy(y + (r0 + i) * ldy + n0, &out[2 * i], 2 * sizeof(v8f));
    }
    for (int i = 0; i < 4; ++i)  // the last n_out % 16 outputs
      for (int n = n_main; n < n_out; ++n) {
        float acc = 0.0f;
        for (int k = 0; k < k_in; ++k) acc += x0[i * ldx + k] * wt[static_cast<int64_t>(k) * n_out + n];
        y[(r0 + i) * ldy + n] = acc + b[n];
      }
  }
}

inline void layer_norm(const float* x, const float* w, const float* b, float* y, int width) {
  float mean = 0.0f;
  for (int i = 0; i < width; ++i) mean += x[i];
  mean /= width;
  float var = 0.0f;
  for (int i = 0; i < width; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= width;
  const float inv = 1.0f / std::sqrt(var + LN_EPS);
  for (int i = 0; i < width; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

// exp(x) for float, branch-free so the loops over the 256 logits vectorise (libm's expf is a call per
// element): x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r (max rel. error ~2 ulp), then 2^n
// through the exponent bits. Inputs below -87.3 (e^x under the smallest normal float, -inf included) give 0,
// above 88.7 +inf, NaN gives NaN.
inline float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.33654f), 88.72283f);
  // round to nearest by the 1.5 * 2^23 trick: nearbyint is a libm call without SSE4.1
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693145751953125f;  // ln2 split in two for an exact first product
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float y;
  std::memcpy(&y, &bits, sizeof(y));
  y = x < -87.33654f ? 0.0f : y;
  y = x > 88.72283f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

inline float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

// NaN -> -inf (never drawn), +inf -> the largest float: the reference's _sanitize
inline float sanitize(float x) {
  if (std::isnan(x)) return -std::numeric_limits<float>::infinity();
  if (x == std::numeric_limits<float>::infinity()) return FLT_MAX;
  return x;
}

// torch.maximum: NaN if either is NaN
inline float nan_max(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  return a > b ? a : b;
}

// eight lanes of partial results: without -ffast-math the compiler does not reorder a float reduction itself
inline float row_max(const float* x) {  // x has no NaN here (sanitised)
  float m[8];
  for (int j = 0; j < 8; ++j) m[j] = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < V; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  for (int j = 1; j < 8; ++j) m[0] = m[j] > m[0] ? m[j] : m[0];
  return m[0];
}

inline float row_sum(const float* x) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < V; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += x[i + j];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// softmax of a sanitised row; all -inf gives NaN, as torch.softmax
inline void softmax(const float* x, float* p) {
  const float m = row_max(x);
  for (int i = 0; i < V; ++i) p[i] = fast_exp(x[i] - m);
  const float s = row_sum(p);
  for (int i = 0; i < V; ++i) p[i] /= s;
}

// Nucleus truncation with ties kept together (the reference's top_p_filter): keep every p >= tau, tau the
// largest value whose at-or-above mass reaches top_p; renormalise.
void top_p_filter(float* p, float top_p) {
  std::vector<float> desc(p, p + V);
  std::sort(desc.begin(), desc.end(), [](float a, float b) { return a > b; });
  float tau = 0.0f, mass = 0.0f;
  for (int i = 0; i < V;) {
    int j = i;
    while (j < V && desc[j] == desc[i]) mass += desc[j++];  // a tie group counts together
    if (mass >= top_p) {
      tau = desc[i];
      break;
    }
    i = j;
  }
  float s = 0.0f;
  for (int i = 0; i < V; ++i) {
    p[i] = p[i] >= tau ? p[i] : 0.0f;
    s += p[i];
  }
  for (int i = 0; i < V; ++i) p[i] /= s;
}

// Philox4x32-10, the first output word, as fractal_kernels/reference/philox.py
float philox_uniform(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return static_cast<float>(c0 >> 8) * (1.0f / 16777216.0f);
}

// The sampler contract's draw (fractal_kernels/reference/pixel_sampling.py): q = trunc(p * 2^52) exactly, the CDF
// and its total T (the last element) are exact int64 sums, t = u * T in fp64 (u <= 0 or NaN -> 0, u >= 1 ->
// t = T - 1), id = the first i with C_i > t -- never a zero-probability entry; -1 for a row without mass.
int inverse_cdf(const float* p, double u) {
  int64_t cdf[V];
  int64_t s = 0;
  for (int i = 0; i < V; ++i) cdf[i] = (s += static_cast<int64_t>(p[i] * 4503599627370496.0f));  // trunc
  if (s <= 0) return -1;
  u = u > 0.0 ? u : 0.0;
  const double total = static_cast<double>(s);
  const double target = u < 1.0 ? u * total : total - 1.0;
  int id = 0;
  for (int i = 0; i < V; ++i) id += static_cast<double>(cdf[i]) <= target ? 1 : 0;
  return id;
}

int argmax(const float* x) {  // first maximum; NaN counts as the maximum, as torch.argmax
  if (std::isnan(row_sum(x))) {  // only the exponential race can see a NaN (or inf - inf), rarely: scan
    int best = 0;
    for (int i = 0; i < V; ++i) {
      if (std::isnan(x[i])) return i;
      if (x[i] > x[best]) best = i;
    }
    return best;
  }
  const float m = row_max(x);
  int i = 0;
  while (x[i] != m) ++i;
  return i;
}

}  // namespace

extern "C" {

// Returns 0 on success. Shapes: cond [rows, c_in]; weight_ptrs: the 20 PixelHeadWeights tensors (W = width,
// D = depth, M = hidden), then cond_w, codebooks, qkv_w, proj_w, fc1_w, fc2_w transposed to [.., K, N];
// cfg_rows [B] or null (then cfg_scalar); uniforms [3, B] fp64 (DRAW_UNIFORMS); exponentials [3, B, 256]
// (DRAW_EXPONENTIALS); ids [B, 3] out; logits [3, rows, 256] out or null.
int fk_pixel_head_sample_f32(const float* cond, int64_t rows, int64_t c_in, const float* const* weight_ptrs,
                             int64_t width, int64_t depth, int64_t hidden, int64_t num_heads, int guided,
                             const float* cfg_rows, float cfg_scalar, float inv_temp, float filter_threshold,
                             float top_p, int draw, const double* uniforms, const float* exponentials,
                             uint64_t seed, uint64_t offset, int64_t* ids, float* logits_out) {
  if (width <= 0 || num_heads <= 0 || width % num_heads || rows < 0 || (guided && rows % 2)) return 1;
  Weights w;
  std::memcpy(&w, weight_ptrs, sizeof(Weights));
  if (rows == 0) return 0;
  const int W = static_cast<int>(width), D = static_cast<int>(depth), M = static_cast<int>(hidden);
  const int C = static_cast<int>(c_in), H = static_cast<int>(num_heads), Dh = W / H;
  const int64_t B = guided ? rows / 2 : rows;
  const int halves = guided ? 2 : 1;
  const int R = TILE * halves;  // tile rows: [cond rows of the tile's pixels; their uncond rows]
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const float t = draw == DRAW_GREEDY ? 1.0f : inv_temp;

  std::vector<float> x(R * W), hn(R * W), qkv(R * 3 * W), o(R * W), y(R * W), mlp(static_cast<size_t>(R) * M),
      lg(static_cast<size_t>(R) * V), mixed(V), probs(V), tok(R * std::max(W, C));
  std::vector<float> kv(static_cast<size_t>(std::max(D, 1)) * R * 3 * 2 * W);  // [D, R, token, k|v, W]
  auto kv_at = [&](int d, int r, int j) { return kv.data() + ((static_cast<size_t>(d) * R + r) * 3 + j) * 2 * W; };
  int prev[TILE];
  bool dead[TILE];

  for (int64_t b0 = 0; b0 < B; b0 += TILE) {
    const int nb = static_cast<int>(std::min<int64_t>(TILE, B - b0));  // pixels in this tile
    const int nr = nb * halves;
    auto src_row = [&](int r) { return (r < nb ? b0 + r : B + b0 + (r - nb)); };  // tile row -> cond row
    for (int i = 0; i < nb; ++i) dead[i] = false, prev[i] = 0;
    for (int c = 0; c < 3; ++c) {
      // token c of every row: cond_proj(cond) for channel 0, else the previous channel's codebook row
      if (c == 0) {
        for (int r = 0; r < nr; ++r) std::memcpy(tok.data() + r * C, cond + src_row(r) * C, C * sizeof(float));
        linear_rows(w.cond_t, w.cond_b, tok.data(), C, y.data(), W, nr, W, C);
      } else {
        for (int r = 0; r < nr; ++r)
          std::memcpy(y.data() + r * W, w.codebooks + (static_cast<int64_t>(c - 1) * V + prev[r % nb]) * W,
                      W * sizeof(float));
      }
      for (int r = 0; r < nr; ++r) layer_norm(y.data() + r * W, w.ln_w, w.ln_b, x.data() + r * W, W);
      for (int d = 0; d < D; ++d) {
        for (int r = 0; r < nr; ++r) layer_norm(x.data() + r * W, w.norm1_w + d * W, w.norm1_b + d * W, hn.data() + r * W, W);
        linear_rows(w.qkv_t + static_cast<int64_t>(d) * 3 * W * W, w.qkv_b + d * 3 * W, hn.data(), W, qkv.data(),
                    3 * W, nr, 3 * W, W);
        for (int r = 0; r < nr; ++r) {
          const float* q_all = qkv.data() + r * 3 * W;
          std::memcpy(kv_at(d, r, c), q_all + W, 2 * W * sizeof(float));  // this token's k, v
          for (int hd = 0; hd < H; ++hd) {
            const float* q = q_all + hd * Dh;
            float s[3], m = -std::numeric_limits<float>::infinity(), z = 0.0f;
            for (int j = 0; j <= c; ++j) {
              const float* k = kv_at(d, r, j) + hd * Dh;
              float dot = 0.0f;
              for (int e = 0; e < Dh; ++e) dot += q[e] * k[e];
              s[j] = dot * scale;
              m = std::max(m, s[j]);
            }
            for (int j = 0; j <= c; ++j) z += (s[j] = std::exp(s[j] - m));
            float* orow = o.data() + r * W + hd * Dh;
            for (int e = 0; e < Dh; ++e) orow[e] = 0.0f;
            for (int j = 0; j <= c; ++j) {
              const float pj = s[j] / z;
              const float* v = kv_at(d, r, j) + W + hd * Dh;
              for (int e = 0; e < Dh; ++e) orow[e] += pj * v[e];
            }
          }
        }
        linear_rows(w.proj_t + static_cast<int64_t>(d) * W * W, w.proj_b + d * W, o.data(), W, y.data(), W, nr, W, W);
        for (int i = 0; i < nr * W; ++i) x[i] += y[i];
        for (int r = 0; r < nr; ++r) layer_norm(x.data() + r * W, w.norm2_w + d * W, w.norm2_b + d * W, hn.data() + r * W, W);
        linear_rows(w.fc1_t + static_cast<int64_t>(d) * M * W, w.fc1_b + d * M, hn.data(), W, mlp.data(), M, nr, M, W);
        for (int64_t i = 0; i < static_cast<int64_t>(nr) * M; ++i) mlp[i] = gelu(mlp[i]);
        linear_rows(w.fc2_t + static_cast<int64_t>(d) * W * M, w.fc2_b + d * W, mlp.data(), M, y.data(), W, nr, W, M);
        for (int i = 0; i < nr * W; ++i) x[i] += y[i];
      }
      for (int r = 0; r < nr; ++r) layer_norm(x.data() + r * W, w.norm_w, w.norm_b, hn.data() + r * W, W);
      linear_rows(w.codebooks_t + static_cast<int64_t>(c) * V * W, w.mlm_bias + c * V, hn.data(), W, lg.data(), V,
                  nr, V, W);
      if (logits_out)
        for (int r = 0; r < nr; ++r)
          std::memcpy(logits_out + (static_cast<int64_t>(c) * rows + src_row(r)) * V, lg.data() + r * V,
                      V * sizeof(float));

      // the sampler, per pixel: sample_logits' math
      for (int i = 0; i < nb; ++i) {
        const int64_t b = b0 + i;
        float* xc = lg.data() + static_cast<size_t>(i) * V;
        for (int k = 0; k < V; ++k) xc[k] = sanitize(xc[k] * t);
        if (guided) {
          float* xu = lg.data() + static_cast<size_t>(nb + i) * V;
          for (int k = 0; k < V; ++k) xu[k] = sanitize(xu[k] * t);
          const float cfg = cfg_rows ? cfg_rows[b] : cfg_scalar;
          softmax(xc, probs.data());  // the conditional probabilities the filter looks at
          const float max_c = row_max(xc), max_u = row_max(xu);
          for (int k = 0; k < V; ++k) {
            float u = xu[k];
            const float rep = nan_max(u, xc[k] - max_c + max_u);
            u = probs[k] < filter_threshold ? rep : u;
            mixed[k] = sanitize(u + cfg * (xc[k] - u));
          }
        } else {
          std::memcpy(mixed.data(), xc, V * sizeof(float));
        }
        int id = -1;
        if (std::isfinite(row_max(mixed.data()))) {
          if (draw == DRAW_GREEDY) {
            id = argmax(mixed.data());
          } else {
            softmax(mixed.data(), probs.data());
            if (top_p < 1.0f) top_p_filter(probs.data(), top_p);
            if (draw == DRAW_EXPONENTIALS) {
              const float* e = exponentials + (static_cast<int64_t>(c) * B + b) * V;
              for (int k = 0; k < V; ++k) probs[k] = probs[k] / e[k];
              id = argmax(probs.data());
            } else {
              const double u = draw == DRAW_UNIFORMS ? uniforms[c * B + b]
                                                     : static_cast<double>(philox_uniform(seed, offset + c * B + b));
              id = inverse_cdf(probs.data(), u);
            }
          }
        }
        if (dead[i]) id = -1;
        dead[i] = dead[i] || id < 0;
        ids[b * 3 + c] = id;
        prev[i] = id < 0 ? 0 : id;  // a dead pixel's placeholder token; its ids stay -1 anyway
      }
    }
  }
  return 0;
}

}  // extern "C"
