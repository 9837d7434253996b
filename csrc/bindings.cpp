// Python bindings of the CUDA ops (module fractal_kernels._C). Argument checking lives in the Python
// launchers (fractal_kernels/ops/*.py); here we only assert what the kernels rely on.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "pixel_head/pixel_head_kernels.cuh"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fractal-kernels CUDA ops";
  m.def("sample_logits", &sample_logits, "fused pixel sampler (see fractal_kernels.sample_logits)");
  m.def("ce_rows", &ce_rows, "cross-entropy rows: loss and in-place (softmax - onehot) * scale");
}
