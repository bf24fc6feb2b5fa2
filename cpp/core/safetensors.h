// Read-only safetensors files over mmap, with a fully validated header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace medusa_rt {

// A read-only memory mapping of a whole file. Throws ModelNotFoundError / ModelFormatError.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into the mapping
  size_t nbytes = 0;
  const std::string* file = nullptr;  // the file it lives in (for messages)
  int64_t numel() const;
  std::string shape_str() const;
};

// One safetensors file. The header is checked completely on open: its length, JSON syntax,
// known dtypes, non-negative shapes, offsets inside the data section, byte sizes equal to
// shape x dtype size, and no overlapping tensors. Any violation is a ModelFormatError naming
// the file and the tensor.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  // The header's "__metadata__" (string to string), empty if absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return file_->path(); }
  // Throws ModelFormatError naming the tensor and this file if absent.
  const TensorView& get(const std::string& name) const;

 private:
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// The tensors of a model: `<dir>/<stem>.safetensors`, or the shards listed in
// `<dir>/<stem>.safetensors.index.json`.
class TensorStore {
 public:
  TensorStore(const std::string& dir, const std::string& stem);
  // nullptr if absent.
  const TensorView* find(const std::string& name) const;
  // Throws ModelFormatError naming the tensor if absent.
  const TensorView& get(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::string& description() const { return description_; }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
  std::string description_;
};

std::string read_text_file(const std::string& path);  // throws ModelNotFoundError
bool file_exists(const std::string& path);
bool dir_exists(const std::string& path);

}  // namespace medusa_rt
