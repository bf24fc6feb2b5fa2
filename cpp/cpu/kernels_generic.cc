// Portable kernels: plain C++, no ISA assumptions beyond the build's baseline.
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "cpu/kernels.h"
#include "cpu/packing.h"

namespace medusa_rt::cpu {
namespace {

inline float load_w(const void* w, WType wt, int64_t i) {
  switch (wt) {
    case WType::kF32: return static_cast<const float*>(w)[i];
    case WType::kBF16:
    case WType::kBF16Pairs: return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
    case WType::kF16: return f16_to_f32(static_cast<const uint16_t*>(w)[i]);
    case WType::kI8: break;  // needs its scale: see weight()
  }
  return 0.f;
}

// W[n, k] as the GEMMs multiply it (int8: q * scale, rounded once to fp32 as in the SIMD kernels).
inline float weight(const void* w, WType wt, int n, int k, int K) {
  if (wt != WType::kI8) return load_w(w, wt, packed_index(n, k, K, wt));
  float scale;
  std::memcpy(&scale, static_cast<const uint8_t*>(w) + i8_scale_index(n, k, K), 4);
  return float(static_cast<const int8_t*>(w)[packed_index(n, k, K, wt)]) * scale;
}

// Same packed layout and the same per-element order (one chain over k, then the bias) as the
// AVX2 kernel, with separate multiply and add instead of fused multiply-add. kBF16Pairs (the
// AVX512-BF16 kernel's type, run here only as a fallback): the inputs rounded to bf16 likewise,
// products summed in k order (the dot-product instruction may round its pair sums differently).
void gemm_generic(const float* x, int ldx, int M, int K, const void* w, WType wt, const float* bias, int n0, int n1,
                  float* y, int ldy) {
  for (int n = n0; n < n1; ++n) {
    for (int m = 0; m < M; ++m) {
      const float* xm = x + static_cast<int64_t>(m) * ldx;
      float s = 0.f;
      for (int k = 0; k < K; ++k) {
        const float xv = wt == WType::kBF16Pairs ? bf16_to_f32(f32_to_bf16(xm[k])) : xm[k];
        s += xv * weight(w, wt, n, k, K);
      }
      y[static_cast<int64_t>(m) * ldy + n] = bias ? s + bias[n] : s;
    }
  }
}

template <class T>
void attend_one(const AttendArgs& a) {
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  auto val = [](const T* p, int64_t i) {
    if constexpr (sizeof(T) == 2) {
      return bf16_to_f32(p[i]);
    } else {
      return p[i];
    }
  };
  const int n = a.end - a.begin;
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) {
    const int pos = a.begin + j;
    const int64_t key = pos < a.prefix_len ? pos : a.extra[pos - a.prefix_len];
    float s = 0.f;
    for (int d = 0; d < a.head_dim; ++d) s += a.q[d] * val(kc, key * a.head_dim + d);
    s *= a.scale;
    a.scores[j] = s;
    mx = s > mx ? s : mx;
  }
  float sum = 0.f;
  for (int j = 0; j < n; ++j) {
    a.scores[j] = std::exp(a.scores[j] - mx);
    sum += a.scores[j];
  }
  a.stats[0] = mx;
  a.stats[1] = sum;
  for (int d = 0; d < a.head_dim; ++d) a.out[d] = 0.f;
  for (int j = 0; j < n; ++j) {
    const int pos = a.begin + j;
    const int64_t key = pos < a.prefix_len ? pos : a.extra[pos - a.prefix_len];
    for (int d = 0; d < a.head_dim; ++d) a.out[d] += a.scores[j] * val(vc, key * a.head_dim + d);
  }
}

void attend_generic(const AttendArgs* a, int nq) {
  for (int i = 0; i < nq; ++i) {
    if (a[i].kv_bf16) {
      attend_one<uint16_t>(a[i]);
    } else {
      attend_one<float>(a[i]);
    }
  }
}

void silu_mul_generic(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

void add_silu_generic(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i] / (1.0f + std::exp(-y[i]));
}

uint64_t stream_read_generic(const void* p, size_t bytes) {
  const uint64_t* v = static_cast<const uint64_t*>(p);
  uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t i = 0; i < bytes / 8; i += 8) {
    for (int j = 0; j < 8; ++j) a[j] ^= v[i + j];
  }
  return a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
}

float fma_burn_generic(int64_t iters) {
  float a[12][8];
  for (int i = 0; i < 12; ++i) {
    for (int l = 0; l < 8; ++l) a[i][l] = 1e-3f * float(i);
  }
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 12; ++i) {
      for (int l = 0; l < 8; ++l) a[i][l] = a[i][l] * 0.999f + 1e-4f;
    }
  }
  float s = 0;
  for (int i = 0; i < 12; ++i) {
    for (int l = 0; l < 8; ++l) s += a[i][l];
  }
  return s;
}

}  // namespace

const Kernels& generic_kernels() {
  static const Kernels k{"generic", gemm_generic, attend_generic, silu_mul_generic, add_silu_generic,
                          stream_read_generic, fma_burn_generic};
  return k;
}

}  // namespace medusa_rt::cpu
