// Large CPU output buffers that are kept for reuse after they are freed (the fused op's B x C
// gradient), so that a training loop does not fault fresh pages in every step.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace gala::cpu {

// at::empty(sizes, options) for a CPU tensor, from the cache of freed blocks when it holds one of
// the same byte size (blocks under kMinCachedBytes come from torch's allocator as usual).
at::Tensor empty_reusable(at::IntArrayRef sizes, const at::TensorOptions& options);

// Returns every cached block to the system; the number of bytes released.
int64_t release_cached_buffers();

// Bytes held by the cache now (freed blocks only; blocks in use are not counted).
int64_t cached_buffer_bytes();

}  // namespace gala::cpu
