#include "core/json.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "medusa_rt/errors.h"

namespace medusa_rt::json {

const Value* Value::find(const std::string& key) const {
  if (type_ != Type::kObject) return nullptr;
  auto it = obj_.find(key);
  return it == obj_.end() ? nullptr : &it->second;
}

const char* Value::type_name(Type t) {
  switch (t) {
    case Type::kNull: return "null";
    case Type::kBool: return "bool";
    case Type::kNumber: return "number";
    case Type::kString: return "string";
    case Type::kArray: return "array";
    case Type::kObject: return "object";
  }
  return "?";
}

class Parser {
 public:
  Parser(std::string_view s, const std::string& what) : s_(s), what_(what) {}

  Value parse_document() {
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("trailing characters after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 256;

  [[noreturn]] void fail(const std::string& msg) const {
    throw ModelFormatError(what_ + ": invalid JSON at offset " + std::to_string(pos_) + ": " + msg);
  }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  char peek() {
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }

  void expect_literal(const char* lit) {
    std::string_view l(lit);
    if (s_.substr(pos_, l.size()) != l) fail(std::string("expected '") + lit + "'");
    pos_ += l.size();
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting too deep");
    char c = peek();
    Value v;
    switch (c) {
      case '{': parse_object(v, depth); break;
      case '[': parse_array(v, depth); break;
      case '"': v.type_ = Value::Type::kString; v.str_ = parse_string(); break;
      case 't': expect_literal("true"); v.type_ = Value::Type::kBool; v.bool_ = true; break;
      case 'f': expect_literal("false"); v.type_ = Value::Type::kBool; v.bool_ = false; break;
      case 'n': expect_literal("null"); break;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) {
          parse_number(v);
        } else if (c == 'N' || c == 'I') {
          // Python's json.dump writes NaN / Infinity; accept them as numbers.
          if (s_.substr(pos_, 3) == "NaN") { pos_ += 3; v.type_ = Value::Type::kNumber; v.num_ = NAN; }
          else { expect_literal("Infinity"); v.type_ = Value::Type::kNumber; v.num_ = INFINITY; }
        } else {
          fail(std::string("unexpected character '") + c + "'");
        }
    }
    return v;
  }

  void parse_object(Value& v, int depth) {
    v.type_ = Value::Type::kObject;
    ++pos_;
    if (peek() == '}') { ++pos_; return; }
    while (true) {
      if (peek() != '"') fail("expected a string key");
      std::string key = parse_string();
      if (peek() != ':') fail("expected ':'");
      ++pos_;
      Value member = parse_value(depth + 1);
      if (!v.obj_.emplace(std::move(key), std::move(member)).second) fail("duplicate key");
      char c = peek();
      ++pos_;
      if (c == '}') return;
      if (c != ',') fail("expected ',' or '}'");
    }
  }

  void parse_array(Value& v, int depth) {
    v.type_ = Value::Type::kArray;
    ++pos_;
    if (peek() == ']') { ++pos_; return; }
    while (true) {
      v.arr_.push_back(parse_value(depth + 1));
      char c = peek();
      ++pos_;
      if (c == ']') return;
      if (c != ',') fail("expected ',' or ']'");
    }
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t parse_hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      char h = s_[pos_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= h - '0';
      else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return cp;
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (s_.substr(pos_, 2) != "\\u") fail("unpaired surrogate");
            pos_ += 2;
            uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo >= 0xE000) fail("bad low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            fail("unpaired surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }

  void parse_number(Value& v) {
    size_t start = pos_;
    bool integral = true;
    if (s_[pos_] == '-') ++pos_;
    if (pos_ < s_.size() && s_[pos_] == 'I') {  // -Infinity
      expect_literal("Infinity");
      v.type_ = Value::Type::kNumber;
      v.num_ = -INFINITY;
      return;
    }
    auto digits = [&] {
      size_t d = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == d) fail("malformed number");
    };
    digits();
    if (pos_ < s_.size() && s_[pos_] == '.') { ++pos_; digits(); integral = false; }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      digits();
      integral = false;
    }
    std::string text(s_.substr(start, pos_ - start));
    v.type_ = Value::Type::kNumber;
    v.num_ = std::strtod(text.c_str(), nullptr);
    if (integral) {
      errno = 0;
      char* end = nullptr;
      long long iv = std::strtoll(text.c_str(), &end, 10);
      if (errno == 0 && end && *end == '\0') { v.is_int_ = true; v.int_ = iv; }
    } else if (std::isfinite(v.num_) && v.num_ == std::floor(v.num_) && std::fabs(v.num_) < 9.0e15) {
      v.is_int_ = true;
      v.int_ = static_cast<int64_t>(v.num_);
    }
  }

  std::string_view s_;
  const std::string& what_;
  size_t pos_ = 0;
};

Value parse(std::string_view text, const std::string& what) { return Parser(text, what).parse_document(); }

}  // namespace medusa_rt::json
