// Python bindings of the CUDA ops (module fractal_kernels._C). Argument checking lives in the Python
// launchers (fractal_kernels/ops/*.py); here we only assert what the kernels rely on.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "pixel_head/pixel_head_kernels.cuh"
#include "tiny_attention/tiny_attention_kernels.cuh"

namespace fk = fractal_kernels;

namespace {

fk::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return fk::DType::kFloat32;
    case torch::kFloat16: return fk::DType::kFloat16;
    case torch::kBFloat16: return fk::DType::kBFloat16;
    default: TORCH_CHECK(false, "cond_logits: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void sample_logits(const torch::Tensor& cond, const c10::optional<torch::Tensor>& uncond,
                   const c10::optional<torch::Tensor>& cfg_rows, const c10::optional<torch::Tensor>& uniforms,
                   torch::Tensor ids, const c10::optional<torch::Tensor>& probs, double inv_temp, double cfg_scalar,
                   double filter_threshold, double top_p, int64_t top_k, uint64_t seed, uint64_t offset,
                   bool greedy) {
  TORCH_CHECK(cond.is_cuda() && cond.dim() == 2 && cond.stride(1) == 1, "cond_logits: CUDA [N, V], last dim contiguous");
  TORCH_CHECK(cond.size(1) <= 1024, "cond_logits: the CUDA sampler supports V <= 1024, got ", cond.size(1));
  const c10::cuda::CUDAGuard guard(cond.device());
  torch::Tensor cfg_f, uni_d;
  if (cfg_rows) cfg_f = cfg_rows->to(torch::kFloat32).contiguous();
  if (uniforms) uni_d = uniforms->to(torch::kFloat64).contiguous();
  fk::SampleLogitsArgs a{};
  a.cond = cond.data_ptr();
  a.uncond = uncond ? uncond->data_ptr() : nullptr;
  a.cfg_rows = cfg_rows ? cfg_f.data_ptr<float>() : nullptr;
  a.uniforms = uniforms ? uni_d.data_ptr<double>() : nullptr;
  a.ids = ids.data_ptr<int64_t>();
  a.probs = probs ? probs->data_ptr<float>() : nullptr;
  a.n_rows = cond.size(0);
  a.V = cond.size(1);
  a.stride_c = cond.stride(0);
  a.stride_uc = uncond ? uncond->stride(0) : 0;
  a.stride_p = probs ? probs->stride(0) : 0;
  a.dtype = dtype_of(cond);
  a.inv_temp = static_cast<float>(inv_temp);
  a.cfg_scalar = static_cast<float>(cfg_scalar);
  a.filter_threshold = static_cast<float>(filter_threshold);
  a.top_p = static_cast<float>(top_p);
  a.top_k = static_cast<int>(top_k);
  a.seed = seed;
  a.offset = offset;
  a.greedy = greedy;
  const cudaError_t err = fk::launch_sample_logits(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sample_logits CUDA launch failed: ", cudaGetErrorString(err));
}

void ce_rows(torch::Tensor logits, const torch::Tensor& target, torch::Tensor loss,
             const c10::optional<torch::Tensor>& row_scale, int64_t ignore_index, bool write_grad) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == torch::kFloat32 && logits.stride(1) == 1,
              "logits: CUDA float32 [M, V], last dim contiguous");
  TORCH_CHECK(logits.size(1) <= 1024, "logits: the CUDA cross-entropy supports V <= 1024, got ", logits.size(1));
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaError_t err = fk::launch_ce_rows(
      logits.data_ptr<float>(), target.data_ptr<int64_t>(), loss.data_ptr<float>(),
      row_scale ? row_scale->data_ptr<float>() : nullptr, logits.size(0), logits.size(1), logits.stride(0),
      ignore_index, write_grad, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ce_rows CUDA launch failed: ", cudaGetErrorString(err));
}

// ---- tiny attention ----------------------------------------------------------------------------------------

fk::DType attn_dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return fk::DType::kFloat32;
    case torch::kFloat16: return fk::DType::kFloat16;
    case torch::kBFloat16: return fk::DType::kBFloat16;
    default: TORCH_CHECK(false, "tiny_attention: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// A CUDA [N, H, L, D] tensor of q's shape, dtype and device with a contiguous head dim.
fk::AttnTensor attn_operand(const torch::Tensor& t, const torch::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 4 && t.sizes() == q.sizes(), "tiny_attention: ", name,
              " must be a CUDA tensor of shape ", q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "tiny_attention: ", name, " must have dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "tiny_attention: ", name, " is on ", t.device(), ", q on ", q.device());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "tiny_attention: ", name, " needs stride(-1) == 1, got ",
              t.stride(3));
  return fk::AttnTensor{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

void check_attn_shape(const torch::Tensor& q) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4, "tiny_attention: q must be a CUDA tensor [N, H, L, D], got ",
              q.sizes());
  TORCH_CHECK(fk::tiny_attention_supports_head_dim(q.size(3)),
              "tiny_attention: head dim D must be one of 16, 32, 64, 80, 128 for the CUDA kernels, got ", q.size(3));
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= fk::kTinyAttentionMaxLen,
              "tiny_attention: the CUDA kernels support 1 <= L <= ", fk::kTinyAttentionMaxLen, ", got ", q.size(2));
}

void check_lse(const torch::Tensor& lse, const torch::Tensor& q) {
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == torch::kFloat32 &&
                  lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              "tiny_attention: lse must be a contiguous float32 CUDA tensor [N, H, L]");
}

// int32 contiguous [N] lengths (converted if given as another integer type), or nullptr.
const int* seqlens_ptr(const c10::optional<torch::Tensor>& seqlens, const torch::Tensor& q, torch::Tensor& holder) {
  if (!seqlens.has_value()) return nullptr;
  const torch::Tensor& s = *seqlens;
  TORCH_CHECK(s.device() == q.device() && s.dim() == 1 && s.size(0) == q.size(0),
              "tiny_attention: seqlens must be a [N] tensor on q's device");
  TORCH_CHECK(!s.is_floating_point() && !s.is_complex(), "tiny_attention: seqlens must be an integer tensor");
  holder = s.to(torch::kInt32).contiguous();
  return holder.data_ptr<int>();
}

void tiny_attention_fwd(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor o,
                        torch::Tensor lse, const c10::optional<torch::Tensor>& seqlens, bool causal, double scale) {
  check_attn_shape(q);
  const c10::cuda::CUDAGuard guard(q.device());
  fk::TinyAttentionFwdArgs a{};
  a.q = attn_operand(q, q, "q");
  a.k = attn_operand(k, q, "k");
  a.v = attn_operand(v, q, "v");
  a.o = attn_operand(o, q, "o");
  check_lse(lse, q);
  a.lse = lse.data_ptr<float>();
  torch::Tensor lens;
  a.seqlens = seqlens_ptr(seqlens, q, lens);
  a.N = q.size(0);
  a.H = q.size(1);
  a.L = q.size(2);
  a.D = q.size(3);
  a.dtype = attn_dtype_of(q);
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  const cudaError_t err = fk::launch_tiny_attention_fwd(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err != cudaErrorInvalidValue, "tiny_attention_fwd: unsupported shape (head dim ", a.D, ", L ", a.L, ")");
  TORCH_CHECK(err == cudaSuccess, "tiny_attention_fwd CUDA launch failed: ", cudaGetErrorString(err));
}

void tiny_attention_bwd(const torch::Tensor& dout, const torch::Tensor& q, const torch::Tensor& k,
                        const torch::Tensor& v, const torch::Tensor& o, const torch::Tensor& lse, torch::Tensor dq,
                        torch::Tensor dk, torch::Tensor dv, const c10::optional<torch::Tensor>& seqlens, bool causal,
                        double scale) {
  check_attn_shape(q);
  const c10::cuda::CUDAGuard guard(q.device());
  fk::TinyAttentionBwdArgs a{};
  a.dout = attn_operand(dout, q, "dout");
  a.q = attn_operand(q, q, "q");
  a.k = attn_operand(k, q, "k");
  a.v = attn_operand(v, q, "v");
  a.o = attn_operand(o, q, "o");
  a.dq = attn_operand(dq, q, "dq");
  a.dk = attn_operand(dk, q, "dk");
  a.dv = attn_operand(dv, q, "dv");
  check_lse(lse, q);
  a.lse = lse.data_ptr<float>();
  torch::Tensor delta = torch::empty({q.size(0), q.size(1), q.size(2)}, lse.options());  // rowsum(dout * o)
  a.delta = delta.data_ptr<float>();
  torch::Tensor lens;
  a.seqlens = seqlens_ptr(seqlens, q, lens);
  a.N = q.size(0);
  a.H = q.size(1);
  a.L = q.size(2);
  a.D = q.size(3);
  a.dtype = attn_dtype_of(q);
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  const cudaError_t err = fk::launch_tiny_attention_bwd(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err != cudaErrorInvalidValue, "tiny_attention_bwd: unsupported shape (head dim ", a.D, ", L ", a.L, ")");
  TORCH_CHECK(err == cudaSuccess, "tiny_attention_bwd CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fractal-kernels CUDA ops";
  m.def("sample_logits", &sample_logits, "fused pixel sampler (see fractal_kernels.sample_logits)");
  m.def("ce_rows", &ce_rows, "cross-entropy rows: loss and in-place (softmax - onehot) * scale");
  m.def("tiny_attention_fwd", &tiny_attention_fwd, "tiny-sequence attention forward: o, lse <- (q, k, v)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("seqlens"),
        py::arg("causal"), py::arg("scale"));
  m.def("tiny_attention_bwd", &tiny_attention_bwd, "tiny-sequence attention backward: dq, dk, dv <- dout",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("seqlens"), py::arg("causal"), py::arg("scale"));
}
