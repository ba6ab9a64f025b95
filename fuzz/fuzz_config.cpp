// libFuzzer target: every config parser on the same bytes, and the same bytes as a sharded
// checkpoint's <stem>.safetensors.index.json. A malformed config must end in a ConfigError and
// a malformed index in a WeightError (each naming the source); anything else (another exception
// type, a crash, a sanitizer report, a shard path outside the folder) is a finding.


#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "scratch_dir.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"
#include "wuerstchen/weights.h"

namespace {

template <typename Parse>
void run(Parse parse) {
    try {
        parse();
    } catch (const wuerstchen::ConfigError&) {
        // The expected outcome for a malformed config.
    }
}

[[noreturn]] void finding(const std::string& what) {
    std::fprintf(stderr, "fuzz_config: %s\n", what.c_str());
    std::abort();
}

// One scratch folder per process holding model.safetensors.index.json.
const std::string& index_dir() {
    static const std::string dir = wuerstchen::fuzz::scratch_dir("index").string();
    return dir;
}

void run_index(const std::string& text) {
    const std::string& dir = index_dir();
    {
        std::ofstream out(dir + "/model.safetensors.index.json",
                          std::ios::binary | std::ios::trunc);
        out << text;
        if (!out) finding("cannot write the index");
    }
    try {
        for (const auto& file : wuerstchen::find_weight_files(dir, "model")) {
            const std::string name = file.substr(dir.size() + 1);
            if (file.compare(0, dir.size() + 1, dir + "/") != 0 ||
                name.find('/') != std::string::npos || name.find("..") != std::string::npos)
                finding("shard path '" + file + "' leaves the folder");
        }
    } catch (const wuerstchen::WeightError&) {
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace wuerstchen;
    const std::string text(reinterpret_cast<const char*>(data), size);
    const std::string source = "fuzz/config.json";
    run([&] { CLIPTextConfig::from_json_text(text, source); });
    run([&] { PriorConfig::from_json_text(text, source); });
    run([&] { DiffNeXtConfig::from_json_text(text, source); });
    run([&] { PaellaVQConfig::from_json_text(text, source); });
    run([&] { SchedulerConfig::from_json_text(text, source); });
    run([&] { ModelIndex::from_json_text(text, source); });
    run_index(text);
    return 0;
}
