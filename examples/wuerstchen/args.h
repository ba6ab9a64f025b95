#pragma once

// A small command-line parser for the `wuerstchen` tool: "--flag value" and "--flag=value",
// boolean switches, repeatable flags, and one error line naming the offending argument.

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace wuerstchen::cli {

// A usage error: printed as one line, exit status 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct FlagSpec {
    std::string name;        // without the leading "--"
    std::string value_name;  // empty for a switch
    std::string help;
    bool repeatable = false;
};

class Args {
public:
    Args(std::string command, std::vector<FlagSpec> specs);

    // Parses argv[first..argc); throws UsageError for unknown flags, missing values, repeats.
    void parse(int argc, char** argv, int first);

    bool has(const std::string& name) const;
    bool help() const { return help_; }
    const std::vector<std::string>& positional() const { return positional_; }

    std::string str(const std::string& name, const std::string& fallback = "") const;
    std::vector<std::string> all(const std::string& name) const;
    // Typed values; a malformed number is a UsageError naming the flag.
    int integer(const std::string& name, int fallback) const;
    double number(const std::string& name, double fallback) const;
    std::optional<uint64_t> seed(const std::string& name) const;

    std::string usage(const std::string& synopsis) const;

private:
    const FlagSpec* find(const std::string& name) const;
    std::string command_;
    std::vector<FlagSpec> specs_;
    std::map<std::string, std::vector<std::string>> values_;
    std::vector<std::string> positional_;
    bool help_ = false;
};

}  // namespace wuerstchen::cli
