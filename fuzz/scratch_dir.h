#pragma once

// A scratch folder per fuzzing process (libFuzzer -jobs/-workers run separate processes),
// removed at exit. Header-only: each fuzz target is its own program.

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

namespace wuerstchen::fuzz {

inline std::filesystem::path& scratch_slot() {
    static std::filesystem::path path;
    return path;
}

inline void remove_scratch() {
    std::error_code ec;
    std::filesystem::remove_all(scratch_slot(), ec);
}

// $TMPDIR (or /tmp)/wuerstchen-fuzz-<tag>-<pid>, created on first use.
inline const std::filesystem::path& scratch_dir(const char* tag) {
    static const std::filesystem::path dir = [tag] {
        const char* tmp = std::getenv("TMPDIR");
        const std::filesystem::path d = std::filesystem::path(tmp ? tmp : "/tmp") /
                                        ("wuerstchen-fuzz-" + std::string(tag) + "-" +
                                         std::to_string(::getpid()));
        std::filesystem::create_directories(d);
        scratch_slot() = d;
        std::atexit(remove_scratch);
        return d;
    }();
    return dir;
}

}  // namespace wuerstchen::fuzz
