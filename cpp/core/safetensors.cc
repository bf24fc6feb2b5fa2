#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/json.h"
#include "medusa_rt/errors.h"

namespace medusa_rt {

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool dir_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ModelNotFoundError("cannot open " + path + ": " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) throw ModelNotFoundError("file not found: " + path);
    throw ModelNotFoundError("cannot open " + path + ": " + std::strerror(err));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw ModelFormatError(path + " is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw ModelFormatError("cannot map " + path + ": " + std::strerror(err));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::SafetensorsFile(const std::string& path) {
  file_ = std::make_unique<MappedFile>(path);
  const size_t size = file_->size();
  auto bad = [&](const std::string& msg) { return ModelFormatError("corrupt safetensors file " + path + ": " + msg); };
  if (size < 8) throw bad("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file_->data(), 8);  // little endian on every supported host
  if (header_len > size - 8) {
    throw bad("header length " + std::to_string(header_len) + " exceeds the file size " + std::to_string(size) +
              " (truncated file?)");
  }
  if (header_len > (100u << 20)) throw bad("header length " + std::to_string(header_len) + " is implausibly large");
  const uint8_t* data_start = file_->data() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  json::Value header =
      json::parse(std::string_view(reinterpret_cast<const char*>(file_->data()) + 8, header_len), path + " header");
  if (!header.is_object()) throw bad("header is not a JSON object");

  struct Span { uint64_t begin, end; const std::string* name; };
  std::vector<Span> spans;
  for (const auto& [name, entry] : header.as_object()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw bad("__metadata__ is not an object");
      for (const auto& [k, v] : entry.as_object()) {
        if (!v.is_string()) throw bad("__metadata__ value '" + k + "' is not a string");
        metadata_[k] = v.as_string();
      }
      continue;
    }
    auto tbad = [&](const std::string& msg) { return bad("tensor '" + name + "': " + msg); };
    if (!entry.is_object()) throw tbad("entry is not an object");
    const json::Value* dt = entry.find("dtype");
    const json::Value* shape = entry.find("shape");
    const json::Value* offs = entry.find("data_offsets");
    if (!dt || !dt->is_string()) throw tbad("missing or non-string 'dtype'");
    if (!shape || !shape->is_array()) throw tbad("missing or non-array 'shape'");
    if (!offs || !offs->is_array() || offs->as_array().size() != 2) throw tbad("'data_offsets' must be [begin, end]");
    TensorView v;
    v.name = name;
    if (!parse_dtype(dt->as_string(), &v.dtype)) throw tbad("unknown dtype '" + dt->as_string() + "'");
    uint64_t numel = 1;
    for (const auto& d : shape->as_array()) {
      if (!d.is_integer() || d.as_int() < 0) throw tbad("shape entries must be non-negative integers");
      v.shape.push_back(d.as_int());
      if (d.as_int() > 0 && numel > (uint64_t(1) << 62) / static_cast<uint64_t>(d.as_int())) throw tbad("shape too large");
      numel *= static_cast<uint64_t>(d.as_int());
    }
    const auto& o = offs->as_array();
    if (!o[0].is_integer() || !o[1].is_integer() || o[0].as_int() < 0 || o[1].as_int() < o[0].as_int()) {
      throw tbad("data_offsets must be integers with 0 <= begin <= end");
    }
    uint64_t begin = o[0].as_int(), end = o[1].as_int();
    if (end > data_size) {
      throw tbad("data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                 ") out of range: the data section has " + std::to_string(data_size) + " bytes (truncated file?)");
    }
    uint64_t expect = numel * dtype_size(v.dtype);
    if (end - begin != expect) {
      throw tbad("holds " + std::to_string(end - begin) + " bytes but shape " + v.shape_str() + " of " +
                 dtype_name(v.dtype) + " needs " + std::to_string(expect));
    }
    v.data = data_start + begin;
    v.nbytes = end - begin;
    v.file = &file_->path();
    auto it = tensors_.emplace(name, std::move(v)).first;
    spans.push_back({begin, end, &it->first});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].begin < spans[i - 1].end) {
      throw bad("tensors '" + *spans[i - 1].name + "' and '" + *spans[i].name + "' overlap");
    }
  }
}

const TensorView& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw ModelFormatError("tensor '" + name + "' is missing from " + path());
  return it->second;
}

TensorStore::TensorStore(const std::string& dir, const std::string& stem) {
  const std::string single = dir + "/" + stem + ".safetensors";
  const std::string index = dir + "/" + stem + ".safetensors.index.json";
  std::vector<std::string> paths;
  if (file_exists(index)) {
    json::Value idx = json::parse(read_text_file(index), index);
    const json::Value* wm = idx.find("weight_map");
    if (!wm || !wm->is_object()) throw ModelFormatError(index + ": missing 'weight_map' object");
    for (const auto& [name, file] : wm->as_object()) {
      if (!file.is_string() || file.as_string().find('/') != std::string::npos) {
        throw ModelFormatError(index + ": bad shard name for tensor '" + name + "'");
      }
      if (std::find(paths.begin(), paths.end(), dir + "/" + file.as_string()) == paths.end()) {
        paths.push_back(dir + "/" + file.as_string());
      }
    }
    description_ = index;
  } else if (file_exists(single)) {
    paths.push_back(single);
    description_ = single;
  } else {
    throw ModelNotFoundError("no " + stem + ".safetensors (or " + stem + ".safetensors.index.json) in " + dir);
  }
  for (const auto& p : paths) {
    files_.push_back(std::make_unique<SafetensorsFile>(p));
    for (const auto& [name, view] : files_.back()->tensors()) {
      if (!index_.emplace(name, &view).second) {
        throw ModelFormatError("tensor '" + name + "' appears in more than one shard of " + description_);
      }
    }
  }
}

const TensorView* TensorStore::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

const TensorView& TensorStore::get(const std::string& name) const {
  const TensorView* v = find(name);
  if (!v) throw ModelFormatError("tensor '" + name + "' is missing from " + description_);
  return *v;
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  for (const auto& kv : index_) out.push_back(kv.first);
  return out;
}

}  // namespace medusa_rt
