#include "cpu/packing.h"

#include <cstring>

#include "core/dtype.h"

namespace medusa_rt::cpu {

size_t wtype_size(WType t) { return t == WType::kF32 ? 4 : 2; }

size_t packed_bytes(int N, int K, WType t) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  return size_t(panels * panel_elems(K)) * wtype_size(t);
}

void pack_rows(const void* src, int N, int K, WType t, void* dst) {
  const size_t es = wtype_size(t);
  const uint8_t* s = static_cast<const uint8_t*>(src);
  uint8_t* d = static_cast<uint8_t*>(dst);
  std::memset(d, 0, packed_bytes(N, K, t));
  for (int n = 0; n < N; ++n) {
    uint8_t* panel = d + size_t(n / kPanel) * panel_elems(K) * es;
    const int lane = packed_lane(n % kPanel, t);
    const uint8_t* row = s + size_t(n) * K * es;
    for (int k = 0; k < K; ++k) std::memcpy(panel + (size_t(k) * kPanel + lane) * es, row + size_t(k) * es, es);
  }
}

void unpack_row(const void* packed, int N, int K, WType t, int n, float* out) {
  const size_t base = size_t(packed_offset(n, K, t));
  for (int k = 0; k < K; ++k) {
    const size_t off = base + size_t(k) * kPanel;
    switch (t) {
      case WType::kF32: out[k] = static_cast<const float*>(packed)[off]; break;
      case WType::kBF16: out[k] = bf16_to_f32(static_cast<const uint16_t*>(packed)[off]); break;
      default: out[k] = f16_to_f32(static_cast<const uint16_t*>(packed)[off]); break;
    }
  }
}

}  // namespace medusa_rt::cpu
