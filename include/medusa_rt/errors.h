// medusa_rt — typed exceptions.
//
// Every error the library reports is one of these classes; each maps one to one to the
// Python exception of the same name in `medusa_rt.errors`. All derive from medusa_rt::Error,
// which derives from std::runtime_error; what() names the problem (and the file, tensor or
// option involved).
#pragma once

#include <stdexcept>
#include <string>

namespace medusa_rt {

/// Base class of every medusa_rt exception.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// An argument or option is invalid: bad option value, token id out of range,
/// negative max_new_tokens, empty prompt, ...
class InvalidArgumentError : public Error {
 public:
  using Error::Error;
};

/// A model directory or file does not exist.
class ModelNotFoundError : public Error {
 public:
  using Error::Error;
};

/// A model file exists but is corrupt, truncated or inconsistent: bad safetensors header,
/// offsets out of range, unknown dtype, tensor shape mismatch, malformed config.json.
class ModelFormatError : public Error {
 public:
  using Error::Error;
};

/// The model is well formed but uses an architecture or feature this build does not support.
class UnsupportedModelError : public Error {
 public:
  using Error::Error;
};

/// A request does not fit the engine: prompt longer than max_seq_len, no free sequence slot,
/// not enough memory to create the engine.
class CapacityError : public Error {
 public:
  using Error::Error;
};

}  // namespace medusa_rt
