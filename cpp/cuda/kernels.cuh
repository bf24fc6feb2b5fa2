// Device kernels of the CUDA backend (everything but the GEMM). Activations are fp32 rows;
// weights are bf16 or fp16 rows padded to a multiple of 8 columns (see cuda_backend.cu).
//
// Every per-row result is computed by one thread block in an order that depends only on that
// row's own data and length (never on the batch's other rows), so a tree row and the plain
// decoding row for the same token see bit-identical values: the lossless contract of greedy
// Medusa holds on the GPU as on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "model/step_ops.h"

namespace medusa_rt {
namespace cuda {

constexpr int kBlock = 256;

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Sum over the block in a fixed order (warp shuffles, then warp 0 over the warp sums).
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? red[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

__device__ __forceinline__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? red[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

// The better of two (value, index) candidates in ranking order: larger value, then lower index.
struct Ranked {
  float v;
  int i;
};
__device__ __forceinline__ bool ranks_before(const Ranked& a, const Ranked& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

__device__ __forceinline__ Ranked block_best(Ranked c, Ranked* red) {
  for (int o = 16; o > 0; o >>= 1) {
    Ranked other{__shfl_xor_sync(0xffffffffu, c.v, o), __shfl_xor_sync(0xffffffffu, c.i, o)};
    if (ranks_before(other, c)) c = other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = c;
  __syncthreads();
  if (warp == 0) {
    c = lane < warps ? red[lane] : Ranked{-INFINITY, INT32_MAX};
    for (int o = 16; o > 0; o >>= 1) {
      Ranked other{__shfl_xor_sync(0xffffffffu, c.v, o), __shfl_xor_sync(0xffffffffu, c.i, o)};
      if (ranks_before(other, c)) c = other;
    }
    if (lane == 0) red[0] = c;
  }
  __syncthreads();
  return red[0];
}

// x [M, K] fp32 -> out [M, ldo] 16-bit, columns [K, ldo) zero (the GEMM's padded k).
// fp16 saturates at +-65504 instead of becoming inf (bf16 has fp32's range).
template <class T>
__device__ __forceinline__ float clamp_for(float v) {
  return v;
}
template <>
__device__ __forceinline__ float clamp_for<__half>(float v) {
  return fminf(fmaxf(v, -65504.f), 65504.f);
}

template <class T>
__global__ void to_half_kernel(const float* __restrict__ x, int K, int ldo, T* __restrict__ out) {
  const int r = blockIdx.x;
  for (int c = threadIdx.x; c < ldo; c += blockDim.x) {
    out[size_t(r) * ldo + c] = from_float<T>(c < K ? clamp_for<T>(x[size_t(r) * K + c]) : 0.f);
  }
}

__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias, int N) {
  const int r = blockIdx.x;
  for (int c = threadIdx.x; c < N; c += blockDim.x) y[size_t(r) * N + c] += bias[c];
}

template <class T>
__global__ void embed_kernel(const T* __restrict__ table, int ld, int cols, const int32_t* __restrict__ tokens,
                             float* __restrict__ out) {
  const int r = blockIdx.x;
  const T* row = table + size_t(tokens[r]) * ld;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) out[size_t(r) * cols + c] = to_float(row[c]);
}

__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w, int dim, float eps,
                               float* __restrict__ out) {
  __shared__ float red[32];
  const float* xr = x + size_t(blockIdx.x) * dim;
  float ss = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, red);
  const float inv = 1.0f / sqrtf(ss / dim + eps);
  float* o = out + size_t(blockIdx.x) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = w[i] * (xr[i] * inv);
}

__global__ void rope_kernel(float* __restrict__ x, int row_stride, int col0, int heads, int head_dim,
                            const int32_t* __restrict__ positions, const float* __restrict__ cos_t,
                            const float* __restrict__ sin_t) {
  const int r = blockIdx.x, half = head_dim / 2;
  const float* c = cos_t + size_t(positions[r]) * half;
  const float* s = sin_t + size_t(positions[r]) * half;
  for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
    const int h = t / half, i = t % half;
    float* v = x + size_t(r) * row_stride + col0 + size_t(h) * head_dim;
    const float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i] + a * s[i];
  }
}

__global__ void kv_store_kernel(const float* __restrict__ qkv, int row_stride, int k_col0, int v_col0,
                                const int32_t* __restrict__ slots, const int32_t* __restrict__ cache_index,
                                int kv_heads, int max_seq, int head_dim, float* __restrict__ k_cache,
                                float* __restrict__ v_cache) {
  const int r = blockIdx.x;
  const float* row = qkv + size_t(r) * row_stride;
  for (int t = threadIdx.x; t < kv_heads * head_dim; t += blockDim.x) {
    const int h = t / head_dim, d = t % head_dim;
    const size_t dst = ((size_t(slots[r]) * kv_heads + h) * max_seq + cache_index[r]) * head_dim + d;
    k_cache[dst] = row[k_col0 + t];
    v_cache[dst] = row[v_col0 + t];
  }
}

// One block per (row, query head). Visible keys: [0, prefix_len) then the row's extra cache
// indices. Scores go to shared memory (max_seq floats); the j-th visible key is handled by warp
// j % warps whatever the row kind, so equal inputs give equal outputs.
__global__ void attention_kernel(const float* __restrict__ qkv, int row_stride, int heads, int group,
                                 const int32_t* __restrict__ slots, const int32_t* __restrict__ prefix_len,
                                 const int32_t* __restrict__ extra_offsets, const int32_t* __restrict__ extra,
                                 int kv_heads, int max_seq, int head_dim, float scale,
                                 const float* __restrict__ k_cache, const float* __restrict__ v_cache,
                                 float* __restrict__ out) {
  extern __shared__ float smem[];
  __shared__ float red[32];
  const int r = blockIdx.x, h = blockIdx.y, kvh = h / group;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float* q = smem;                 // [head_dim]
  float* scores = smem + head_dim;  // [n]
  float* part = scores + max_seq;   // [blockDim.x]
  const float* qr = qkv + size_t(r) * row_stride + size_t(h) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q[d] = qr[d];
  const int prefix = prefix_len[r];
  const int e0 = extra_offsets ? extra_offsets[r] : 0, ne = extra_offsets ? extra_offsets[r + 1] - e0 : 0;
  const int n = prefix + ne;
  const size_t base = (size_t(slots[r]) * kv_heads + kvh) * max_seq * head_dim;
  const float* K = k_cache + base;
  const float* V = v_cache + base;
  __syncthreads();
  for (int j = warp; j < n; j += warps) {
    const int idx = j < prefix ? j : extra[e0 + j - prefix];
    const float* kr = K + size_t(idx) * head_dim;
    float s = 0.f;
    for (int d = lane; d < head_dim; d += 32) s += q[d] * kr[d];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) scores[j] = s * scale;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, scores[j]);
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const float p = expf(scores[j] - mx);
    scores[j] = p;
    sum += p;
  }
  sum = block_sum(sum, red);  // also orders the score writes before the reads below
  const float inv = 1.0f / sum;
  // Output (head_dim <= blockDim.x): thread t owns dimension t % head_dim for keys
  // j = t / head_dim (mod groups); the groups are then added in order.
  const int groups = int(blockDim.x) / head_dim;
  const int g = threadIdx.x / head_dim, d = threadIdx.x % head_dim;
  float acc = 0.f;
  if (g < groups) {
    for (int j = g; j < n; j += groups) {
      const int idx = j < prefix ? j : extra[e0 + j - prefix];
      acc += scores[j] * V[size_t(idx) * head_dim + d];
    }
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  if (int(threadIdx.x) < head_dim) {
    float o = 0.f;
    for (int gg = 0; gg < groups; ++gg) o += part[gg * head_dim + threadIdx.x];
    out[size_t(r) * heads * head_dim + size_t(h) * head_dim + threadIdx.x] = o * inv;
  }
}

__global__ void silu_mul_kernel(const float* __restrict__ gu, int dim, float* __restrict__ out) {
  const int r = blockIdx.x;
  const float* g = gu + size_t(r) * 2 * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float a = g[i];
    out[size_t(r) * dim + i] = a / (1.0f + expf(-a)) * g[dim + i];
  }
}

__global__ void add_kernel(float* __restrict__ x, const float* __restrict__ y, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    x[i] += y[i];
  }
}

__global__ void add_silu_kernel(float* __restrict__ x, const float* __restrict__ y, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    x[i] += y[i] / (1.0f + expf(-y[i]));
  }
}

__global__ void map_ids_kernel(int32_t* __restrict__ ids, size_t n, const int32_t* __restrict__ table) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    ids[i] = table[ids[i]];
  }
}

__global__ void gather_rows_kernel(const float* __restrict__ x, int dim, const int32_t* __restrict__ index,
                                   float* __restrict__ out) {
  const int i = blockIdx.x;
  const float* src = x + size_t(index[i]) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) out[size_t(i) * dim + c] = src[c];
}

// First index of the maximum of each row.
__global__ void argmax_kernel(const float* __restrict__ logits, int vocab, int32_t* __restrict__ out) {
  __shared__ Ranked red[32];
  const float* l = logits + size_t(blockIdx.x) * vocab;
  // The marker {-inf, INT32_MAX} loses to every index, so -inf logits rank as on the CPU.
  Ranked best{-INFINITY, INT32_MAX};
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const Ranked c{l[i], i};
    if (ranks_before(c, best)) best = c;
  }
  best = block_best(best, red);
  if (threadIdx.x == 0) out[blockIdx.x] = best.i < vocab ? best.i : 0;
}

// The k best of each row in ranking order (value descending, lower index first): pass j takes
// the best candidate ranked after pass j-1's pick. k passes over the row; k is small (<= 64).
__global__ void topk_kernel(const float* __restrict__ logits, int vocab, int k, int32_t* __restrict__ out) {
  __shared__ Ranked red[32];
  const float* l = logits + size_t(blockIdx.x) * vocab;
  Ranked prev{FLT_MAX, -1};
  bool first = true;
  for (int j = 0; j < k; ++j) {
    Ranked best{-INFINITY, INT32_MAX};
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const Ranked c{l[i], i};
      if ((first || ranks_before(prev, c)) && ranks_before(c, best)) best = c;
    }
    best = block_best(best, red);
    if (threadIdx.x == 0) out[size_t(blockIdx.x) * k + j] = best.i < vocab ? best.i : 0;
    prev = best;
    first = false;
  }
}

// lse = log sum exp(z), entropy = -sum p log(p + 1e-5), z = logits / temperature (double sums).
__global__ void softmax_stats_kernel(const float* __restrict__ logits, int vocab, float inv_t,
                                     float* __restrict__ lse, float* __restrict__ entropy) {
  __shared__ float red[32];
  __shared__ double dred[kBlock];
  const float* l = logits + size_t(blockIdx.x) * vocab;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, l[i] * inv_t);
  mx = block_max(mx, red);
  auto dsum = [&](double v) {
    dred[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (int(threadIdx.x) < s) dred[threadIdx.x] += dred[threadIdx.x + s];
      __syncthreads();
    }
    const double total = dred[0];
    __syncthreads();
    return total;
  };
  double sum = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += exp(double(l[i] * inv_t - mx));
  const double log_z = log(dsum(sum)) + mx;
  double h = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const double p = exp(double(l[i] * inv_t) - log_z);
    h -= p * log(p + 1e-5);
  }
  h = dsum(h);
  if (threadIdx.x == 0) {
    lse[blockIdx.x] = float(log_z);
    entropy[blockIdx.x] = float(h);
  }
}

// KV compaction: copies i = 0..n-1 in order for every (layer, kv head, element) owned by a
// thread, so a copy never reads an entry an earlier copy of the list has not yet written.
__global__ void kv_copy_kernel(float* __restrict__ k_cache, float* __restrict__ v_cache, int layers, int kv_heads,
                               int max_seq, int head_dim, size_t layer_elems, const int32_t* __restrict__ slots,
                               const int32_t* __restrict__ src, const int32_t* __restrict__ dst, int n) {
  const size_t total = size_t(layers) * kv_heads * head_dim;
  for (size_t t = blockIdx.x * size_t(blockDim.x) + threadIdx.x; t < total; t += size_t(gridDim.x) * blockDim.x) {
    const int d = int(t % head_dim);
    const int h = int((t / head_dim) % kv_heads);
    const size_t l = t / (size_t(head_dim) * kv_heads);
    for (int i = 0; i < n; ++i) {
      const size_t row = l * layer_elems + (size_t(slots[i]) * kv_heads + h) * max_seq * head_dim;
      k_cache[row + size_t(dst[i]) * head_dim + d] = k_cache[row + size_t(src[i]) * head_dim + d];
      v_cache[row + size_t(dst[i]) * head_dim + d] = v_cache[row + size_t(src[i]) * head_dim + d];
    }
  }
}

// The fused decode step's device parts (model/step_ops.h): one thread per row / sequence / entry.
__global__ void tree_rows_kernel(TreeRowsArgs a) {
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < a.n * a.T; r += gridDim.x * blockDim.x) {
    step_ops::tree_row(a, r / a.T, r % a.T);
  }
}

__global__ void accept_greedy_kernel(AcceptArgs a) {
  for (int s = blockIdx.x * blockDim.x + threadIdx.x; s < a.n; s += gridDim.x * blockDim.x) {
    step_ops::accept_sequence(a, s);
  }
}

__global__ void scatter_candidates_kernel(const int32_t* __restrict__ cand, int n, int num_heads, int k,
                                          const int32_t* __restrict__ slots, int32_t* __restrict__ dst) {
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n * num_heads * k; t += gridDim.x * blockDim.x) {
    const int j = t % k, h = (t / k) % num_heads, r = t / (k * num_heads);
    step_ops::scatter_candidate(cand, n, num_heads, k, slots, dst, r, h, j);
  }
}

}  // namespace cuda
}  // namespace medusa_rt
