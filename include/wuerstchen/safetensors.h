#pragma once

// Reader and writer for the safetensors format (https://github.com/huggingface/safetensors).
// The file is memory-mapped once; tensors are views of the mapping (no copy) until the caller
// converts them. The header is validated completely at open(): length bounds, JSON, dtype,
// shape x dtype size == byte length, offsets inside the data region and not overlapping.

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace wuerstchen {

// The dtypes the library reads. Others (F64, I8, U8, BOOL, F8_*) are rejected at open().
enum class DType { F32, F16, BF16, I64, I32 };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);
torch::ScalarType to_scalar_type(DType dtype);

struct TensorInfo {
    std::string name;
    DType dtype = DType::F32;
    std::vector<int64_t> shape;
    uint64_t begin = 0;  // byte offsets relative to the start of the data region
    uint64_t end = 0;
};

class SafeTensors {
public:
    // Opens and validates `path`. Throws IoError when it cannot be opened and WeightError
    // (naming the file, and the tensor where there is one) when it is malformed.
    static SafeTensors open(const std::string& path);

    const std::string& path() const;
    // Tensor names, sorted.
    std::vector<std::string> keys() const;
    bool contains(const std::string& name) const;
    size_t size() const;
    // Throws WeightError "<file>: no tensor '<name>'" when absent.
    const TensorInfo& info(const std::string& name) const;
    // A CPU tensor of the stored dtype. It shares memory with the mapping (read-only: do not
    // write into it) and keeps the mapping alive. Unaligned data is copied once.
    torch::Tensor tensor(const std::string& name) const;
    // The free-form "__metadata__" string map (empty when absent).
    const std::map<std::string, std::string>& metadata() const;

private:
    struct Impl;
    explicit SafeTensors(std::shared_ptr<const Impl> impl);
    std::shared_ptr<const Impl> impl_;
};

// Writes tensors (any device; F32/F16/BF16/I64/I32) in the safetensors format, in the given order.
// Throws InvalidArgument for an unsupported dtype or duplicate name, IoError on write failure.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace wuerstchen
