// Allocation failures as OutOfMemoryError (declared in pipeline_common.h): a source of its own
// so that parts without the pipelines (the tokenizer, in the fuzz targets) can link it.

#include <c10/util/Exception.h>

#include <string>

#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"

namespace wuerstchen {

bool is_out_of_memory(const c10::Error& error) {
    if (dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr) return true;
    const std::string msg = error.what_without_backtrace();
    // The CPU allocator reports failure as a plain c10::Error ("DefaultCPUAllocator: can't
    // allocate memory" in 1.13, "not enough memory" in 2.x).
    return msg.find("can't allocate memory") != std::string::npos ||
           msg.find("not enough memory") != std::string::npos ||
           msg.find("out of memory") != std::string::npos;
}

void throw_out_of_memory(const char* where, const std::string& detail) {
    std::string first_line = detail.substr(0, detail.find('\n'));
    throw OutOfMemoryError(std::string(where) + ": out of memory (" + first_line +
                           "); try fewer images per prompt, a smaller height/width, or "
                           "LoadOptions::offload or sequential_offload (CLI: --offload, --sequential-offload)");
}

}  // namespace wuerstchen
