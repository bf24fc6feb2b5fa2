// Host memory of the CPU backend: 64-byte aligned blocks carved from slabs that are 2 MB
// aligned and, on Linux, advised as transparent huge pages (MADV_HUGEPAGE). Weights and the KV
// cache are read as long streams every step; on 4 KB pages each 4 KB of such a stream costs a
// TLB miss and a page walk, on 2 MB pages nearly none (measured on the 2-core EPYC: the GEMMs
// of a SmolLM2 forward took 5-10% less time at 1-8 rows). MEDUSA_RT_HUGEPAGES=0 turns the
// advice off (slabs stay, on 4 KB pages): for side-by-side benchmarks, or systems where THP
// compaction stalls are unwelcome.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>

namespace medusa_rt::cpu {

class HostMemory {
 public:
  HostMemory();
  ~HostMemory();
  HostMemory(const HostMemory&) = delete;
  HostMemory& operator=(const HostMemory&) = delete;

  // A block of at least `bytes` bytes, 64-byte aligned; nullptr when the system has no memory.
  void* allocate(size_t bytes);
  // Frees a block from allocate(); a slab goes back to the system with its last block.
  void deallocate(void* p);

 private:
  struct Slab {
    size_t size = 0, used = 0;
    int live = 0;  // blocks not yet freed
  };
  char* new_slab(size_t bytes);
  std::mutex mu_;
  std::map<char*, Slab> slabs_;  // by base address
  char* current_ = nullptr;      // the slab small blocks are carved from
  size_t total_ = 0;             // bytes in slabs
  bool huge_pages_ = true;
};

}  // namespace medusa_rt::cpu
