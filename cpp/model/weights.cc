#include "model/weights.h"

#include <cstring>

#include "medusa_rt/errors.h"

namespace medusa_rt {
namespace {

void convert_into(const TensorView& t, DType dst_type, void* dst) {
  const int64_t n = t.numel();
  if (t.dtype == dst_type) {
    std::memcpy(dst, t.data, t.nbytes);
    return;
  }
  auto src_at = [&](int64_t i) -> float {
    uint16_t h;
    float f;
    switch (t.dtype) {
      case DType::kF32: std::memcpy(&f, t.data + 4 * i, 4); return f;
      case DType::kBF16: std::memcpy(&h, t.data + 2 * i, 2); return bf16_to_f32(h);
      case DType::kF16: std::memcpy(&h, t.data + 2 * i, 2); return f16_to_f32(h);
      default: return 0.f;
    }
  };
  switch (dst_type) {
    case DType::kF32: {
      float* d = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = src_at(i);
      break;
    }
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src_at(i));
      break;
    }
    case DType::kF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(src_at(i));
      break;
    }
    default: throw Error("internal: bad conversion target");
  }
}

// The host type a matrix of `dtype` is staged in: int8 matrices are quantized by the backend
// from fp32 values (Backend::upload_matrix).
DType staging_dtype(DType dtype) { return dtype == DType::kI8 ? DType::kF32 : dtype; }

}  // namespace

size_t matrix_bytes(DType dtype, int rows, int cols) {
  const size_t n = size_t(rows) * cols;
  return dtype == DType::kI8 ? n + (size_t(cols + kI8WeightGroup - 1) / kI8WeightGroup) * rows * 4
                             : n * dtype_size(dtype);
}

void check_float_dtype(const TensorView& t) {
  if (t.dtype != DType::kF32 && t.dtype != DType::kBF16 && t.dtype != DType::kF16) {
    throw ModelFormatError("tensor '" + t.name + "' in " + *t.file + " has dtype " + dtype_name(t.dtype) +
                           "; expected F32, BF16 or F16");
  }
}

void check_shape(const TensorView& t, const std::vector<int64_t>& expect, const std::string& source) {
  check_float_dtype(t);
  if (t.shape != expect) {
    TensorView e;
    e.shape = expect;
    throw ModelFormatError("tensor '" + t.name + "' in " + *t.file + " has shape " + t.shape_str() + " but " + source +
                           " requires " + e.shape_str());
  }
}

WeightArena::~WeightArena() {
  for (void* p : allocations_) be_.deallocate(p);
}

void* WeightArena::buffer(size_t bytes, const char* what) {
  void* p = be_.allocate(bytes, what);
  allocations_.push_back(p);
  return p;
}


Matrix WeightArena::matrix(const std::vector<const TensorView*>& parts, int cols, DType dtype) {
  int rows = 0;
  for (const TensorView* t : parts) {
    check_float_dtype(*t);
    if (t->shape.size() != 2 || t->shape[1] != cols) {
      throw ModelFormatError("tensor '" + t->name + "' in " + *t->file + " has shape " + t->shape_str() +
                             "; expected [*, " + std::to_string(cols) + "]");
    }
    rows += static_cast<int>(t->shape[0]);
  }
  const DType host = staging_dtype(dtype);
  const size_t es = dtype_size(host);
  std::vector<uint8_t> staging(es * size_t(rows) * cols);
  size_t off = 0;
  for (const TensorView* t : parts) {
    convert_into(*t, host, staging.data() + off);
    off += es * size_t(t->numel());
  }
  Matrix m = be_.upload_matrix(staging.data(), dtype, rows, cols, ("weights (" + parts[0]->name + ")").c_str());
  allocations_.push_back(const_cast<void*>(m.data));
  weight_bytes_ += matrix_bytes(dtype, rows, cols);
  return m;
}

Matrix WeightArena::rows_of(const Matrix& src, const std::vector<int32_t>& rows, DType dtype, const char* what) {
  const DType host = staging_dtype(dtype);
  const size_t es = dtype_size(host), cols = size_t(src.cols);
  std::vector<uint8_t> staging(es * rows.size() * cols);
  std::vector<float> row(cols);
  for (size_t i = 0; i < rows.size(); ++i) {
    be_.matrix_row(src, rows[i], row.data());
    uint8_t* dst = staging.data() + es * i * cols;
    for (size_t c = 0; c < cols; ++c) {
      if (host == DType::kF32) {
        std::memcpy(dst + 4 * c, &row[c], 4);
      } else {
        const uint16_t h = host == DType::kBF16 ? f32_to_bf16(row[c]) : f32_to_f16(row[c]);
        std::memcpy(dst + 2 * c, &h, 2);
      }
    }
  }
  Matrix m = be_.upload_matrix(staging.data(), dtype, static_cast<int>(rows.size()), src.cols, what);
  allocations_.push_back(const_cast<void*>(m.data));
  weight_bytes_ += matrix_bytes(dtype, static_cast<int>(rows.size()), src.cols);
  return m;
}

const float* WeightArena::vector(const std::vector<const TensorView*>& parts) {
  int64_t total = 0;
  for (const TensorView* t : parts) total += t->numel();
  std::vector<float> host(total);
  int64_t off = 0;
  for (const TensorView* t : parts) {
    check_float_dtype(*t);
    convert_into(*t, DType::kF32, host.data() + off);
    off += t->numel();
  }
  float* dst = static_cast<float*>(buffer(sizeof(float) * total, "norm weights"));
  be_.copy_to_device(dst, host.data(), sizeof(float) * total);
  weight_bytes_ += sizeof(float) * total;
  return dst;
}

}  // namespace medusa_rt
