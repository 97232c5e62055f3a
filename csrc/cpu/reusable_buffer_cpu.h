// Large CPU output buffers that are kept for reuse after they are freed (the fused op's B x C
// gradient), so that a training loop does not fault fresh pages in every step.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace gala::cpu {

// at::empty(sizes, options) for a CPU tensor, contiguous, from the cache of freed blocks when it
// holds one of the same byte size, with the tensor's first byte `page_offset` bytes past a 4 KB
// boundary: its block is one page larger and the tensor starts at a storage offset inside it
// (page_offset: a multiple of the element size in [0, 4096)). Tensors under kMinCachedBytes
// come from at::empty as usual (no cache, no placement).
at::Tensor empty_reusable_at_page_offset(at::IntArrayRef sizes, const at::TensorOptions& options,
                                         int64_t page_offset);

// Returns every cached block to the system; the number of bytes released.
int64_t release_cached_buffers();

// Bytes held by the cache now (freed blocks only; blocks in use are not counted).
int64_t cached_buffer_bytes();

}  // namespace gala::cpu
