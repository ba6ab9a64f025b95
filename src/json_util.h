#pragma once

// Typed access to JSON objects that names the source file and key in every ConfigError.

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "wuerstchen/error.h"

namespace wuerstchen::detail {

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
