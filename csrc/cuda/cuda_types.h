// Types shared by the CUDA kernels' host launchers and their torch bindings (plain C++: the
// bindings are compiled by the host compiler, without nvcc).
#pragma once

#include <cstdint>

namespace gala::cuda {

// What a kernel's logits (and outputs in the input dtype) hold. Math is fp32 for the 16- and
// 32-bit types and fp64 for Float64.
enum class DType : int32_t { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

}  // namespace gala::cuda
