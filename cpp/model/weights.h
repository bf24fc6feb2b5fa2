// Loading checked weights from safetensors views into backend memory.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "model/backend.h"

namespace medusa_rt {

// Throws ModelFormatError naming the tensor and file unless t is F32, BF16 or F16.
void check_float_dtype(const TensorView& t);
// Throws ModelFormatError naming the tensor, its shape and the expected one.
void check_shape(const TensorView& t, const std::vector<int64_t>& expect, const std::string& source);
// Bytes a [rows, cols] weight matrix of dtype holds (int8: a byte per weight and an fp32 scale
// per row and 32 columns, the CPU backend's layout).
size_t matrix_bytes(DType dtype, int rows, int cols);

// Owns what it allocates on the backend; frees it on destruction.
class WeightArena {
 public:
  explicit WeightArena(Backend& be) : be_(be) {}
  ~WeightArena();
  WeightArena(const WeightArena&) = delete;
  WeightArena& operator=(const WeightArena&) = delete;

  // Concatenates the [rows_i, cols] tensors along rows into one matrix of dtype, converted and
  // laid out for the backend.
  Matrix matrix(const std::vector<const TensorView*>& parts, int cols, DType dtype);
  // Rows `rows` of a backend matrix (in that order) as a new matrix of dtype (exact when it is
  // the source's).
  Matrix rows_of(const Matrix& src, const std::vector<int32_t>& rows, DType dtype, const char* what);
  // Concatenates 1-D tensors into one fp32 vector.
  const float* vector(const std::vector<const TensorView*>& parts);
  // Raw backend buffer.
  void* buffer(size_t bytes, const char* what);

  size_t weight_bytes() const { return weight_bytes_; }
  Backend& backend() { return be_; }

 private:
  Backend& be_;
  std::vector<void*> allocations_;
  size_t weight_bytes_ = 0;
};

}  // namespace medusa_rt
