#include "cpu/host_memory.h"

#include <cstdlib>
#include <iterator>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace medusa_rt::cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMaxSlab = size_t(32) << 20;
// Blocks at least this big get a slab of their own (so freeing them returns the memory).
constexpr size_t kOwnSlab = size_t(4) << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

HostMemory::HostMemory() {
  const char* v = std::getenv("MEDUSA_RT_HUGEPAGES");
  huge_pages_ = !(v && v[0] == '0' && v[1] == '\0');
}

HostMemory::~HostMemory() {
  for (auto& [base, slab] : slabs_) std::free(base);
}

char* HostMemory::new_slab(size_t bytes) {
  const size_t size = round_up(bytes, kHuge);
  char* p = static_cast<char*>(std::aligned_alloc(kHuge, size));
  if (!p) return nullptr;
#if defined(MADV_HUGEPAGE)
  // Advice only: where THP is off the slab simply stays on 4 KB pages.
  if (huge_pages_) madvise(p, size, MADV_HUGEPAGE);
#endif
  slabs_[p] = Slab{size, 0, 0};
  total_ += size;
  return p;
}

void* HostMemory::allocate(size_t bytes) {
  const size_t need = round_up(bytes < 64 ? 64 : bytes, 64);
  std::lock_guard<std::mutex> lock(mu_);
  if (need >= kOwnSlab) {
    char* p = new_slab(need);
    if (p) {
      Slab& s = slabs_[p];
      s.used = need;
      s.live = 1;
    }
    return p;
  }
  if (!current_ || slabs_[current_].size - slabs_[current_].used < need) {
    // Slabs grow with what is allocated (2 MB, then about the total so far, at most 32 MB), so
    // a small model wastes little and a big one few slabs.
    size_t size = total_ < kHuge ? kHuge : total_ > kMaxSlab ? kMaxSlab : total_;
    current_ = new_slab(size < need ? need : size);
    if (!current_) return nullptr;
  }
  Slab& s = slabs_[current_];
  char* p = current_ + s.used;
  s.used += need;
  ++s.live;
  return p;
}

void HostMemory::deallocate(void* p) {
  if (!p) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = slabs_.upper_bound(static_cast<char*>(p));
  if (it == slabs_.begin()) return;
  it = std::prev(it);
  if (static_cast<char*>(p) >= it->first + it->second.size || --it->second.live > 0) return;
  if (it->first == current_) current_ = nullptr;
  total_ -= it->second.size;
  std::free(it->first);
  slabs_.erase(it);
}

}  // namespace medusa_rt::cpu
