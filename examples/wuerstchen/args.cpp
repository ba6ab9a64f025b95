#include "args.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace wuerstchen::cli {

Args::Args(std::string command, std::vector<FlagSpec> specs)
    : command_(std::move(command)), specs_(std::move(specs)) {}

const FlagSpec* Args::find(const std::string& name) const {
    for (const auto& s : specs_)
        if (s.name == name) return &s;
    return nullptr;
}

void Args::parse(int argc, char** argv, int first) {
    for (int i = first; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            help_ = true;
            continue;
        }
        if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
            positional_.push_back(arg);
            continue;
        }
        std::string name = arg.substr(2);
        std::optional<std::string> value;
        const auto eq = name.find('=');
        if (eq != std::string::npos) {
            value = name.substr(eq + 1);
            name = name.substr(0, eq);
        }
        const FlagSpec* spec = find(name);
        if (!spec)
            throw UsageError("unknown flag '--" + name + "' for '" + command_ + "' (see wuerstchen " +
                             command_ + " --help)");
        if (spec->value_name.empty()) {
            if (value) throw UsageError("flag '--" + name + "' takes no value");
            value = "1";
        } else if (!value) {
            if (i + 1 >= argc) throw UsageError("flag '--" + name + "' needs a value (" + spec->value_name + ")");
            // "--prompt --seed 3": the next word is one of this command's flags, not a value
            // (write --prompt=--seed for that text).
            const std::string next = argv[i + 1];
            if (next.rfind("--", 0) == 0 && next.size() > 2 &&
                (find(next.substr(2, next.find('=') - 2)) != nullptr || next == "--help"))
                throw UsageError("flag '--" + name + "' needs a value (" + spec->value_name +
                                 "), got the flag '" + next + "'");
            value = argv[++i];
        }
        auto& slot = values_[name];
        if (!slot.empty() && !spec->repeatable)
            throw UsageError("flag '--" + name + "' given more than once");
        slot.push_back(*value);
    }
}

bool Args::has(const std::string& name) const { return values_.count(name) != 0; }

std::string Args::str(const std::string& name, const std::string& fallback) const {
    auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second.back();
}

std::vector<std::string> Args::all(const std::string& name) const {
    auto it = values_.find(name);
    return it == values_.end() ? std::vector<std::string>{} : it->second;
}

int Args::integer(const std::string& name, int fallback) const {
    if (!has(name)) return fallback;
    const std::string v = str(name);
    errno = 0;
    char* end = nullptr;
    const long x = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || errno == ERANGE || x < -2147483647L || x > 2147483647L)
        throw UsageError("flag '--" + name + "' expects an integer, got '" + v + "'");
    return static_cast<int>(x);
}

double Args::number(const std::string& name, double fallback) const {
    if (!has(name)) return fallback;
    const std::string v = str(name);
    char* end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || !std::isfinite(x))
        throw UsageError("flag '--" + name + "' expects a number, got '" + v + "'");
    return x;
}

std::optional<uint64_t> Args::seed(const std::string& name) const {
    if (!has(name)) return std::nullopt;
    const std::string v = str(name);
    errno = 0;
    char* end = nullptr;
    const unsigned long long x = std::strtoull(v.c_str(), &end, 10);
    const size_t digit = !v.empty() && v[0] == '+' ? 1 : 0;  // strtoull also takes blanks, '-'
    if (v.size() <= digit || v[digit] < '0' || v[digit] > '9' || *end != '\0' || errno == ERANGE)
        throw UsageError("flag '--" + name + "' expects a non-negative integer, got '" + v + "'");
    return static_cast<uint64_t>(x);
}

std::string Args::usage(const std::string& synopsis) const {
    std::ostringstream ss;
    ss << "usage: wuerstchen " << command_ << " " << synopsis << "\n\noptions:\n";
    for (const auto& s : specs_) {
        std::string left = "  --" + s.name + (s.value_name.empty() ? "" : " " + s.value_name);
        if (left.size() < 34) left.resize(34, ' ');
        else left += "  ";
        ss << left << s.help << (s.repeatable ? " (repeatable)" : "") << "\n";
    }
    ss << "  --help                          this text\n";
    return ss.str();
}

}  // namespace wuerstchen::cli
