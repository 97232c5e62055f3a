// A small cache of large freed CPU blocks, for the fused op's gradient.
//
// Why: torch's CPU allocator passes every block to glibc malloc. A freed block of 16 MB either
// goes back to the kernel (munmap, or a trim of the heap top) or stays, depending on what else
// the process allocated; when it went back, the next step's gradient is faulted in page by page,
// and each fault zeroes 4 KB. Measured on the project's 2-core EPYC VM (512 x 8,142
// fp32, the fused step alone in a loop): 590-609 page faults per step and 3.0-3.6 ms per step,
// against 0 faults and 2.0-2.6 ms with glibc's trimming turned off (MALLOC_TRIM_THRESHOLD_).
// Kept here instead: at most kMaxCachedBlocks freed blocks of at least kMinCachedBytes, reused
// for a request of exactly the same size (a training loop asks for the same gradient shape every
// step). GALA_CPU_BUFFER_CACHE=0 in the environment turns the cache off;
// release_cached_buffers() (gala_kernels.release_cpu_buffers()) empties it.
// Each block is a page larger than the tensor, so that the tensor can start at the offset within
// a 4 KB page that the caller asks for (the gradient's placement: see gradient_page_offset in
// gala_ce_cpu.cpp); the tensor is a plain contiguous tensor at a storage offset in the block.
#include "reusable_buffer_cpu.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

namespace gala::cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;  // 1 MiB; smaller blocks are cheap to fault in
constexpr size_t kMaxCachedBlocks = 2;               // a step's gradient, and the next one's

bool cache_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("GALA_CPU_BUFFER_CACHE");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

struct Block {
  void* ptr;
  size_t bytes;
};

// Freed blocks, oldest first. Never destroyed (tensors may be freed during process exit).
class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* ptr = it->ptr;
        blocks_.erase(std::next(it).base());
        return ptr;
      }
    }
    return nullptr;
  }

  void give(Block block) {
    Block evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (blocks_.size() == kMaxCachedBlocks) {
        evicted = blocks_.front();
        blocks_.erase(blocks_.begin());
      }
      blocks_.push_back(block);
    }
    if (evicted.ptr) c10::free_cpu(evicted.ptr);
  }

  int64_t release_all() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(blocks_);
    }
    int64_t bytes = 0;
    for (const Block& block : blocks) {
      c10::free_cpu(block.ptr);
      bytes += static_cast<int64_t>(block.bytes);
    }
    return bytes;
  }

  int64_t bytes_held() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t bytes = 0;
    for (const Block& block : blocks_) bytes += static_cast<int64_t>(block.bytes);
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> blocks_;
};

BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

// The DataPtr's context: the block and its size, so that the deleter can cache it.
void return_block(void* context) {
  auto* block = static_cast<Block*>(context);
  block_cache().give(*block);
  delete block;
}

class ReusingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* ptr = block_cache().take(bytes);
    if (ptr == nullptr) ptr = c10::alloc_cpu(bytes);  // 64-byte aligned, like torch's CPU tensors
    return {ptr, new Block{ptr, bytes}, &return_block, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

ReusingCpuAllocator& reusing_allocator() {
  static ReusingCpuAllocator* allocator = new ReusingCpuAllocator();
  return *allocator;
}

size_t nbytes(at::IntArrayRef sizes, const at::TensorOptions& options) {
  size_t bytes = options.dtype().itemsize();
  for (const int64_t size : sizes) bytes *= static_cast<size_t>(size);
  return bytes;
}

}  // namespace

at::Tensor empty_reusable_at_page_offset(at::IntArrayRef sizes, const at::TensorOptions& options,
                                         int64_t page_offset) {
  constexpr int64_t kPage = 4096;
  const size_t bytes = nbytes(sizes, options);
  const int64_t itemsize = static_cast<int64_t>(options.dtype().itemsize());
  TORCH_CHECK(page_offset >= 0 && page_offset < kPage && page_offset % itemsize == 0,
              "empty_reusable_at_page_offset: bad page offset");
  if (bytes < kMinCachedBytes) return at::empty(sizes, options);
  c10::Allocator* allocator = cache_enabled() ? &reusing_allocator() : c10::GetCPUAllocator();
  at::Tensor block = at::detail::empty_generic({static_cast<int64_t>(bytes) / itemsize + kPage / itemsize},
                                               allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                               options.dtype().toScalarType(), std::nullopt);
  const int64_t address = static_cast<int64_t>(reinterpret_cast<uintptr_t>(block.data_ptr()) % kPage);
  const int64_t storage_offset = ((page_offset - address) % kPage + kPage) % kPage / itemsize;
  // A plain contiguous tensor on the block's storage (not a view of `block`: nothing links them).
  at::Tensor tensor = at::detail::make_tensor<c10::TensorImpl>(
      c10::Storage(block.storage()), c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
  tensor.unsafeGetTensorImpl()->set_storage_offset(storage_offset);
  tensor.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return tensor;
}

int64_t release_cached_buffers() { return block_cache().release_all(); }

int64_t cached_buffer_bytes() { return block_cache().bytes_held(); }

}  // namespace gala::cpu
