// A small, strict JSON reader for config.json and safetensors headers.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace medusa_rt::json {

class Value {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Value() = default;
  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }
  // An integral number (no fraction, no exponent making it non-integral) that fits int64.
  bool is_integer() const { return type_ == Type::kNumber && is_int_; }

  bool as_bool() const { return bool_; }
  double as_double() const { return num_; }
  int64_t as_int() const { return int_; }
  const std::string& as_string() const { return str_; }
  const std::vector<Value>& as_array() const { return arr_; }
  const std::map<std::string, Value>& as_object() const { return obj_; }

  // Object member or nullptr (also nullptr if this is not an object).
  const Value* find(const std::string& key) const;

  static const char* type_name(Type t);

 private:
  friend class Parser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  bool is_int_ = false;
  double num_ = 0;
  int64_t int_ = 0;
  std::string str_;
  std::vector<Value> arr_;
  std::map<std::string, Value> obj_;
};

// Parses text; throws ModelFormatError("<what>: invalid JSON at offset N: ...").
Value parse(std::string_view text, const std::string& what);

}  // namespace medusa_rt::json
