#include "cpu/packing.h"

#include <cstring>

#include "core/dtype.h"

namespace medusa_rt::cpu {

size_t wtype_size(WType t) { return t == WType::kF32 ? 4 : 2; }

size_t packed_bytes(int N, int K, WType t) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  return size_t(panels * panel_elems(K, t)) * wtype_size(t);
}

void pack_rows(const void* src, int N, int K, WType t, void* dst) {
  const size_t es = wtype_size(t);
  const uint8_t* s = static_cast<const uint8_t*>(src);
  uint8_t* d = static_cast<uint8_t*>(dst);
  std::memset(d, 0, packed_bytes(N, K, t));
  for (int n = 0; n < N; ++n) {
    const uint8_t* row = s + size_t(n) * K * es;
    for (int k = 0; k < K; ++k) std::memcpy(d + size_t(packed_index(n, k, K, t)) * es, row + size_t(k) * es, es);
  }
}

void unpack_row(const void* packed, int N, int K, WType t, int n, float* out) {
  for (int k = 0; k < K; ++k) {
    const size_t off = size_t(packed_index(n, k, K, t));
    switch (t) {
      case WType::kF32: out[k] = static_cast<const float*>(packed)[off]; break;
      case WType::kBF16:
      case WType::kBF16Pairs: out[k] = bf16_to_f32(static_cast<const uint16_t*>(packed)[off]); break;
      default: out[k] = f16_to_f32(static_cast<const uint16_t*>(packed)[off]); break;
    }
  }
}

}  // namespace medusa_rt::cpu
