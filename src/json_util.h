#pragma once

// Typed access to JSON objects that names the source file and key in every ConfigError.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <string>
#include <vector>

#include "wuerstchen/error.h"

namespace wuerstchen::detail {

// nlohmann's parser is iterative, but its serializer (dump(), used in error messages) and its
// copy constructor recurse once per nesting level, so a hostile file of a few hundred KiB of
// '[' overflows the stack. Real configs, tokenizers and safetensors headers nest fewer than 10
// levels; every parser in the library rejects text nested deeper than this before parsing it.
constexpr size_t kMaxJsonDepth = 256;

// True when the brackets of `text` (outside strings) nest deeper than kMaxJsonDepth. Malformed
// text is not diagnosed here; the JSON parser does that.
inline bool json_too_deep(const char* begin, const char* end) {
    size_t depth = 0;
    bool in_string = false;
    for (const char* p = begin; p != end; ++p) {
        const char c = *p;
        if (in_string) {
            if (c == '\\') {
                if (++p == end) break;
            } else if (c == '"') {
                in_string = false;
            }
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > kMaxJsonDepth) return true;
        } else if ((c == ']' || c == '}') && depth > 0) {
            --depth;
        }
    }
    return false;
}

class JsonFields {
public:
    JsonFields(const nlohmann::json& object, std::string source)
        : object_(object), source_(std::move(source)) {}

    // Parses text; a syntax error or a non-object root is a ConfigError naming the source.
    static nlohmann::json parse_object(const std::string& text, const std::string& source);

    bool has(const std::string& key) const {
        return object_.contains(key) && !object_.at(key).is_null();
    }
    const std::string& source() const { return source_; }

    // Each getter leaves `out` unchanged when the key is absent (the default) and throws a
    // ConfigError "<source>: key '<key>' ..." on a wrong type or a value out of range.
    void get(const std::string& key, int& out) const;
    void get(const std::string& key, double& out) const;
    void get(const std::string& key, bool& out) const;
    void get(const std::string& key, std::string& out) const;
    void get(const std::string& key, std::vector<int>& out) const;
    void get(const std::string& key, std::vector<bool>& out) const;
    void get(const std::string& key, std::vector<std::string>& out) const;
    void get(const std::string& key, std::vector<double>& out) const;

    [[noreturn]] void fail(const std::string& key, const std::string& what) const;

private:
    const nlohmann::json& at(const std::string& key) const { return object_.at(key); }
    int to_int(const std::string& key, const nlohmann::json& v) const;
    double to_double(const std::string& key, const nlohmann::json& v) const;
    bool to_bool(const std::string& key, const nlohmann::json& v) const;

    const nlohmann::json& object_;
    std::string source_;
};

// "<source>: key '<key>' <what>" as a ConfigError.
[[noreturn]] void config_fail(const std::string& source, const std::string& key,
                              const std::string& what);

}  // namespace wuerstchen::detail
