#include "cpu/packing.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/dtype.h"

namespace medusa_rt::cpu {

size_t wtype_size(WType t) { return t == WType::kF32 ? 4 : t == WType::kI8 ? 1 : 2; }

size_t packed_bytes(int N, int K, WType t) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  return size_t(panels * panel_elems(K, t)) * wtype_size(t);
}

namespace {

// Symmetric int8 per (column, group of kI8Group k): scale = max |w| / 127, q = round(w / scale).
void pack_rows_i8(const float* src, int N, int K, uint8_t* dst) {
  for (int n = 0; n < N; ++n) {
    const float* row = src + size_t(n) * K;
    for (int k0 = 0; k0 < K; k0 += kI8Group) {
      const int k1 = std::min(K, k0 + kI8Group);
      float amax = 0.f;
      for (int k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float scale = amax / 127.f;
      std::memcpy(dst + i8_scale_index(n, k0, K), &scale, 4);
      for (int k = k0; k < k1; ++k) {
        const float q = scale > 0.f ? std::nearbyint(row[k] / scale) : 0.f;
        dst[packed_index(n, k, K, WType::kI8)] = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -127.f, 127.f)));
      }
    }
  }
}

}  // namespace

void pack_rows(const void* src, int N, int K, WType t, void* dst) {
  if (t == WType::kI8) {
    std::memset(dst, 0, packed_bytes(N, K, t));
    pack_rows_i8(static_cast<const float*>(src), N, K, static_cast<uint8_t*>(dst));
    return;
  }
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
      case WType::kI8: {
        float scale;
        std::memcpy(&scale, static_cast<const uint8_t*>(packed) + i8_scale_index(n, k, K), 4);
        out[k] = float(static_cast<const int8_t*>(packed)[off]) * scale;
        break;
      }
      default: out[k] = f16_to_f32(static_cast<const uint16_t*>(packed)[off]); break;
    }
  }
}

}  // namespace medusa_rt::cpu
