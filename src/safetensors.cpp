#include "wuerstchen/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>

#include "json_util.h"
#include "wuerstchen/error.h"

namespace wuerstchen {

namespace {

// Headers of real checkpoints are a few hundred KiB; this bound stops a corrupt length from
// driving a huge allocation.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

bool parse_dtype_name(const std::string& s, DType& out) {
    if (s == "F32") out = DType::F32;
    else if (s == "F16") out = DType::F16;
    else if (s == "BF16") out = DType::BF16;
    else if (s == "I64") out = DType::I64;
    else if (s == "I32") out = DType::I32;
    else return false;
    return true;
}

// Read-only mapping of a whole file; unmapped when the last tensor view dies.
struct Mapping {
    void* addr = nullptr;
    size_t size = 0;
    ~Mapping() {
        if (addr && size) ::munmap(addr, size);
    }
};

}  // namespace

const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::F32: return "F32";
        case DType::F16: return "F16";
        case DType::BF16: return "BF16";
        case DType::I64: return "I64";
        case DType::I32: return "I32";
    }
    return "?";
}

size_t dtype_size(DType dtype) {
    switch (dtype) {
        case DType::F32: return 4;
        case DType::F16: return 2;
        case DType::BF16: return 2;
        case DType::I64: return 8;
        case DType::I32: return 4;
    }
    return 0;
}

torch::ScalarType to_scalar_type(DType dtype) {
    switch (dtype) {
        case DType::F32: return torch::kFloat32;
        case DType::F16: return torch::kFloat16;
        case DType::BF16: return torch::kBFloat16;
        case DType::I64: return torch::kInt64;
        case DType::I32: return torch::kInt32;
    }
    return torch::kFloat32;
}

struct SafeTensors::Impl {
    std::string path;
    std::shared_ptr<Mapping> mapping;
    const uint8_t* data = nullptr;  // start of the data region
    uint64_t data_size = 0;
    std::map<std::string, TensorInfo> tensors;
    std::map<std::string, std::string> metadata;

    [[noreturn]] void fail(const std::string& what) const { throw WeightError(path + ": " + what); }
    [[noreturn]] void fail(const std::string& name, const std::string& what) const {
        throw WeightError(path + ": tensor '" + name + "': " + what);
    }
    void parse_header(const char* text, size_t size);
};

void SafeTensors::Impl::parse_header(const char* text, size_t size) {
    if (detail::json_too_deep(text, text + size))
        fail("invalid header JSON: nested deeper than " + std::to_string(detail::kMaxJsonDepth) +
             " levels");
    nlohmann::json header;
    try {
        header = nlohmann::json::parse(text, text + size);
    } catch (const nlohmann::json::exception& e) {
        fail(std::string("invalid header JSON: ") + e.what());
    }
    if (!header.is_object()) fail("header is not a JSON object");

    std::vector<const TensorInfo*> by_offset;
    for (auto it = header.begin(); it != header.end(); ++it) {
        const std::string& name = it.key();
        const nlohmann::json& entry = it.value();
        if (name == "__metadata__") {
            if (!entry.is_object()) fail("'__metadata__' is not an object");
            for (auto m = entry.begin(); m != entry.end(); ++m) {
                if (!m.value().is_string()) fail("'__metadata__' value '" + m.key() + "' is not a string");
                metadata[m.key()] = m.value().get<std::string>();
            }
            continue;
        }
        if (!entry.is_object()) fail(name, "entry is not an object");
        if (!entry.contains("dtype") || !entry["dtype"].is_string()) fail(name, "missing 'dtype'");
        if (!entry.contains("shape") || !entry["shape"].is_array()) fail(name, "missing 'shape'");
        if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() ||
            entry["data_offsets"].size() != 2)
            fail(name, "'data_offsets' must be a [begin, end] pair");

        TensorInfo info;
        info.name = name;
        const std::string dtype = entry["dtype"].get<std::string>();
        if (!parse_dtype_name(dtype, info.dtype))
            fail(name, "unsupported dtype '" + dtype + "' (supported: F32, F16, BF16, I64, I32)");

        // Element count with overflow checks: a hostile shape must not wrap around. The extent
        // (the product with zero dims counted as 1) bounds the contiguous strides, which must fit
        // an int64 even when a zero dim makes the tensor empty (libtorch 2.x rejects it then).
        constexpr uint64_t kMaxExtent = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
        uint64_t elements = 1;
        uint64_t extent = 1;
        for (const auto& d : entry["shape"]) {
            if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0))
                fail(name, "shape entries must be non-negative integers");
            const uint64_t dim = d.get<uint64_t>();
            if (dim > kMaxExtent) fail(name, "shape entry too large");
            if (dim != 0 && extent > kMaxExtent / dim) fail(name, "shape overflows");
            if (dim != 0) extent *= dim;
            elements *= dim;
            info.shape.push_back(static_cast<int64_t>(dim));
        }
        const auto& offs = entry["data_offsets"];
        for (const auto& o : offs)
            if (!o.is_number_unsigned() && !(o.is_number_integer() && o.get<int64_t>() >= 0))
                fail(name, "data_offsets must be non-negative integers");
        info.begin = offs[0].get<uint64_t>();
        info.end = offs[1].get<uint64_t>();
        if (info.begin > info.end) fail(name, "data_offsets begin > end");
        if (info.end > data_size)
            fail(name, "data_offsets [" + std::to_string(info.begin) + ", " +
                           std::to_string(info.end) + ") lie outside the data region of " +
                           std::to_string(data_size) + " bytes");
        const uint64_t esize = dtype_size(info.dtype);
        if (elements > std::numeric_limits<uint64_t>::max() / esize) fail(name, "shape overflows");
        if (elements * esize != info.end - info.begin)
            fail(name, "byte length " + std::to_string(info.end - info.begin) +
                           " does not match shape x dtype size (" +
                           std::to_string(elements * esize) + " bytes)");
        auto [pos, inserted] = tensors.emplace(name, std::move(info));
        if (!inserted) fail(name, "duplicate tensor name");
        // Empty tensors occupy no bytes and cannot overlap anything.
        if (pos->second.begin != pos->second.end) by_offset.push_back(&pos->second);
    }

    // Sorted by begin, non-empty ranges are disjoint iff each starts at or after the previous
    // one's end. (Empty ranges are left out above: skipping them here would compare the
    // neighbours of an empty tensor with it instead of with each other.)
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
        return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    for (size_t i = 1; i < by_offset.size(); ++i) {
        const TensorInfo& prev = *by_offset[i - 1];
        const TensorInfo& cur = *by_offset[i];
        if (cur.begin < prev.end)
            fail("tensors '" + prev.name + "' and '" + cur.name + "' overlap in the data region");
    }
}

SafeTensors::SafeTensors(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

SafeTensors SafeTensors::open(const std::string& path) {
    auto impl = std::make_shared<Impl>();
    impl->path = path;

    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError(path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        ::close(fd);
        throw IoError(path + ": cannot stat (" + std::strerror(errno) + ")");
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw IoError(path + ": not a regular file");
    }
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    if (file_size < 8) {
        ::close(fd);
        impl->fail("truncated file: " + std::to_string(file_size) +
                   " bytes, shorter than the 8-byte header length");
    }
    auto mapping = std::make_shared<Mapping>();
    void* addr = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (addr == MAP_FAILED) throw IoError(path + ": mmap failed (" + std::strerror(errno) + ")");
    mapping->addr = addr;
    mapping->size = file_size;
    const auto* bytes = static_cast<const uint8_t*>(addr);

    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];  // little endian
    if (header_len > file_size - 8)
        impl->fail("header length " + std::to_string(header_len) + " exceeds the file size (" +
                   std::to_string(file_size) + " bytes): truncated or not a safetensors file");
    if (header_len > kMaxHeaderBytes)
        impl->fail("header length " + std::to_string(header_len) + " exceeds the 100 MiB limit");
    impl->mapping = mapping;
    impl->data = bytes + 8 + header_len;
    impl->data_size = file_size - 8 - header_len;
    impl->parse_header(reinterpret_cast<const char*>(bytes + 8), header_len);
    return SafeTensors(std::move(impl));
}

const std::string& SafeTensors::path() const { return impl_->path; }

std::vector<std::string> SafeTensors::keys() const {
    std::vector<std::string> out;
    out.reserve(impl_->tensors.size());
    for (const auto& kv : impl_->tensors) out.push_back(kv.first);
    return out;
}

bool SafeTensors::contains(const std::string& name) const { return impl_->tensors.count(name) != 0; }
size_t SafeTensors::size() const { return impl_->tensors.size(); }

const TensorInfo& SafeTensors::info(const std::string& name) const {
    auto it = impl_->tensors.find(name);
    if (it == impl_->tensors.end()) throw WeightError(impl_->path + ": no tensor '" + name + "'");
    return it->second;
}

torch::Tensor SafeTensors::tensor(const std::string& name) const {
    const TensorInfo& ti = info(name);
    const auto options = torch::TensorOptions().dtype(to_scalar_type(ti.dtype));
    const uint8_t* ptr = impl_->data + ti.begin;
    const size_t nbytes = ti.end - ti.begin;
    if (nbytes == 0 || reinterpret_cast<uintptr_t>(ptr) % dtype_size(ti.dtype) != 0) {
        torch::Tensor out = torch::empty(ti.shape, options);
        if (nbytes) std::memcpy(out.data_ptr(), ptr, nbytes);
        return out;
    }
    std::shared_ptr<Mapping> keep = impl_->mapping;
    return torch::from_blob(
        const_cast<uint8_t*>(ptr), ti.shape, [keep](void*) mutable { keep.reset(); }, options);
}

const std::map<std::string, std::string>& SafeTensors::metadata() const { return impl_->metadata; }

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
    nlohmann::json header = nlohmann::json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::vector<torch::Tensor> cpu;
    uint64_t offset = 0;
    for (const auto& [name, t] : tensors) {
        if (name == "__metadata__" || header.contains(name))
            throw InvalidArgument("save_safetensors: duplicate or reserved tensor name '" + name + "'");
        const char* dt = nullptr;
        switch (t.scalar_type()) {
            case torch::kFloat32: dt = "F32"; break;
            case torch::kFloat16: dt = "F16"; break;
            case torch::kBFloat16: dt = "BF16"; break;
            case torch::kInt64: dt = "I64"; break;
            case torch::kInt32: dt = "I32"; break;
            default:
                throw InvalidArgument("save_safetensors: tensor '" + name + "' has unsupported dtype " +
                                      std::string(c10::toString(t.scalar_type())));
        }
        torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
        const uint64_t nbytes = static_cast<uint64_t>(c.nbytes());
        header[name] = {{"dtype", dt}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
        offset += nbytes;
        cpu.push_back(std::move(c));
    }
    std::string text;
    try {
        text = header.dump();
    } catch (const nlohmann::json::type_error& e) {  // a name or value that is not UTF-8
        throw InvalidArgument("save_safetensors: " + path +
                              ": tensor names and metadata must be valid UTF-8 (" + e.what() + ")");
    }
    // Pad the header with spaces so the data region starts 8-byte aligned, as the reference writer does.
    while ((8 + text.size()) % 8 != 0) text.push_back(' ');
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) throw IoError(path + ": cannot open for writing");
    uint8_t len[8];
    uint64_t n = text.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>((n >> (8 * i)) & 0xff);
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& c : cpu)
        out.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.nbytes()));
    out.flush();
    if (!out) throw IoError(path + ": write failed");
}

}  // namespace wuerstchen
