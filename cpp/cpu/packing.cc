#include "cpu/packing.h"

#include <cstring>

#include "core/dtype.h"

namespace medusa_rt::cpu {

size_t wtype_size(WType t) { return t == WType::kF32 ? 4 : 2; }

size_t packed_bytes(int N, int K, WType t) {
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  return size_t(panels * panel_elems(K)) * wtype_size(t);
}

void pack_rows(const void* src, int N, int K, WType t, void* dst) {
  const size_t es = wtype_size(t);
  const int K8 = padded_k(K);
  const uint8_t* s = static_cast<const uint8_t*>(src);
  uint8_t* d = static_cast<uint8_t*>(dst);
  std::memset(d, 0, packed_bytes(N, K, t));
  for (int n = 0; n < N; ++n) {
    const int p = n / kPanelRows, r = n % kPanelRows;
    uint8_t* panel = d + size_t(p) * kPanelRows * K8 * es;
    for (int c = 0; c * kChunk < K; ++c) {
      const int len = K - c * kChunk < kChunk ? K - c * kChunk : kChunk;
      std::memcpy(panel + (size_t(c) * kPanelRows * kChunk + size_t(r) * kChunk) * es,
                  s + (size_t(n) * K + size_t(c) * kChunk) * es, len * es);
    }
  }
}

void unpack_row(const void* packed, int N, int K, WType t, int n, float* out) {
  const int K8 = padded_k(K);
  const int p = n / kPanelRows, r = n % kPanelRows;
  const size_t base = size_t(p) * kPanelRows * K8 + size_t(r) * kChunk;
  for (int c = 0; c * kChunk < K; ++c) {
    const size_t off = base + size_t(c) * kPanelRows * kChunk;
    const int len = K - c * kChunk < kChunk ? K - c * kChunk : kChunk;
    for (int e = 0; e < len; ++e) {
      float v;
      switch (t) {
        case WType::kF32: v = static_cast<const float*>(packed)[off + e]; break;
        case WType::kBF16: v = bf16_to_f32(static_cast<const uint16_t*>(packed)[off + e]); break;
        default: v = f16_to_f32(static_cast<const uint16_t*>(packed)[off + e]); break;
      }
      out[c * kChunk + e] = v;
    }
  }
}

}  // namespace medusa_rt::cpu
