// libFuzzer target: SafeTensors::open on arbitrary bytes, then every tensor read back and
// compared with the bytes of the input it claims to cover, the metadata walked, and the file
// loaded into a small module through load_weights. A malformed file must end in a WeightError;
// anything else (another exception type, a crash, a sanitizer report, a tensor whose bytes are
// not the file's) is a finding.
//
// The input lives in a memfd reached through /proc/self/fd: no disk traffic, and open() sees a
// regular file as it would on disk.

#include <sys/mman.h>
#include <torch/nn/modules/linear.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "wuerstchen/error.h"
#include "wuerstchen/safetensors.h"
#include "wuerstchen/weights.h"

namespace {

[[noreturn]] void finding(const std::string& what) {
    std::fprintf(stderr, "fuzz_safetensors: %s\n", what.c_str());
    std::abort();
}

const std::string& memfd_path() {
    static const std::string path = [] {
        const int fd = ::memfd_create("fuzz_safetensors", MFD_CLOEXEC);
        if (fd < 0) finding("memfd_create failed");
        return "/proc/self/fd/" + std::to_string(fd);
    }();
    return path;
}

void write_input(const uint8_t* data, size_t size) {
    const int fd = std::stoi(memfd_path().substr(std::strlen("/proc/self/fd/")));
    if (::ftruncate(fd, 0) != 0) finding("ftruncate failed");
    size_t done = 0;
    while (done < size) {
        const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
        if (n <= 0) finding("pwrite failed");
        done += static_cast<size_t>(n);
    }
}

// Every tensor must be exactly the bytes [8 + header_len + begin, 8 + header_len + end) of the
// input.
void check_tensors(const wuerstchen::SafeTensors& st, const uint8_t* data, size_t size) {
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
    const uint64_t data_start = 8 + header_len;
    for (const auto& key : st.keys()) {
        const wuerstchen::TensorInfo& info = st.info(key);
        if (info.begin > info.end || data_start + info.end > size)
            finding("tensor '" + key + "' lies outside the file");
        const torch::Tensor t = st.tensor(key);
        if (t.scalar_type() != wuerstchen::to_scalar_type(info.dtype))
            finding("tensor '" + key + "' has the wrong dtype");
        if (t.sizes() != c10::IntArrayRef(info.shape))
            finding("tensor '" + key + "' has the wrong shape");
        const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
        if (nbytes != info.end - info.begin)
            finding("tensor '" + key + "' has the wrong byte size");
        if (!t.is_contiguous()) finding("tensor '" + key + "' is not contiguous");
        if (nbytes && std::memcmp(t.data_ptr(), data + data_start + info.begin, nbytes) != 0)
            finding("tensor '" + key + "' does not hold the file's bytes");
        // Touch the values through torch too (sum reads every element).
        if (t.numel() > 0 && t.numel() < (1 << 16))
            (void)t.to(torch::kFloat64).sum().item<double>();
    }
    size_t meta_bytes = 0;
    for (const auto& [k, v] : st.metadata()) meta_bytes += k.size() + v.size();
    if (meta_bytes > size) finding("metadata larger than the file");
}

// load_weights into a module with one 2-D and one 1-D parameter: exercises key matching,
// shape comparison and the dtype cast of whatever the fuzzer names "weight" / "bias".
void check_load(const std::string& path) {
    torch::nn::Linear linear(torch::nn::LinearOptions(3, 2));
    try {
        wuerstchen::load_weights(*linear, {path}, wuerstchen::LoadOptions{});
    } catch (const wuerstchen::WeightError&) {
    }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    // libtorch's intra-op pool would only add threads (and noise) to a fuzzer.
    torch::set_num_threads(1);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    write_input(data, size);
    const std::string& path = memfd_path();
    try {
        const auto st = wuerstchen::SafeTensors::open(path);
        check_tensors(st, data, size);
    } catch (const wuerstchen::WeightError&) {
        return 0;
    }
    check_load(path);
    return 0;
}
