// Definitions shared by the CUDA ops' plain C++ interfaces (no torch, no CUDA device code).
#pragma once

namespace fractal_kernels {

// Element type of a floating-point tensor, as the launchers receive it from the bindings.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace fractal_kernels
