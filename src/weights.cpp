#include "wuerstchen/weights.h"

#include <sys/stat.h>
#include <torch/cuda.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "json_util.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"
#include "wuerstchen/safetensors.h"

namespace wuerstchen {

namespace {

bool is_file(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string shape_str(c10::IntArrayRef shape) {
    std::ostringstream ss;
    ss << "[";
    for (size_t i = 0; i < shape.size(); ++i) ss << (i ? ", " : "") << shape[i];
    ss << "]";
    return ss.str();
}

std::string join_files(const std::vector<std::string>& files) {
    std::string out;
    for (size_t i = 0; i < files.size(); ++i) out += (i ? ", " : "") + files[i];
    return out;
}

}  // namespace

torch::ScalarType parse_dtype(const std::string& name) {
    if (name == "fp32" || name == "float32" || name == "float") return torch::kFloat32;
    if (name == "fp16" || name == "float16" || name == "half") return torch::kFloat16;
    if (name == "bf16" || name == "bfloat16") return torch::kBFloat16;
    throw InvalidArgument("dtype: unknown value '" + name + "' (expected fp32, fp16 or bf16)");
}

const char* dtype_label(torch::ScalarType dtype) {
    switch (dtype) {
        case torch::kFloat32: return "fp32";
        case torch::kFloat16: return "fp16";
        case torch::kBFloat16: return "bf16";
        default: return "other";
    }
}

torch::Device parse_device(const std::string& name) {
    if (name == "cpu") return torch::kCPU;
    if (name == "cuda") return torch::Device(torch::kCUDA, 0);
    if (name.rfind("cuda:", 0) == 0) {
        const std::string idx = name.substr(5);
        // DeviceIndex is 8 bits (int8_t): cuda:0 .. cuda:127.
        if (!idx.empty() && idx.size() < 4 &&
            std::all_of(idx.begin(), idx.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
            std::stoi(idx) <= 127)
            return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(std::stoi(idx)));
    }
    throw InvalidArgument("device: unknown value '" + name +
                          "' (expected cpu, cuda or cuda:N with N < 128)");
}

std::vector<std::string> find_weight_files(const std::string& dir, const std::string& stem) {
    const std::string single = dir + "/" + stem + ".safetensors";
    if (is_file(single)) return {single};
    const std::string index = dir + "/" + stem + ".safetensors.index.json";
    if (is_file(index)) {
        const std::string text = read_text_file(index);
        if (detail::json_too_deep(text.data(), text.data() + text.size()))
            throw WeightError(index + ": invalid JSON: nested deeper than " +
                              std::to_string(detail::kMaxJsonDepth) + " levels");
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(text);
        } catch (const nlohmann::json::exception& e) {
            throw WeightError(index + ": invalid JSON: " + e.what());
        }
        if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
            throw WeightError(index + ": key 'weight_map' missing or not an object");
        std::set<std::string> shards;
        for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
            if (!it.value().is_string())
                throw WeightError(index + ": key 'weight_map." + it.key() + "' is not a file name");
            const std::string shard = it.value().get<std::string>();
            if (shard.empty())
                throw WeightError(index + ": key 'weight_map." + it.key() +
                                  "' names no shard file (empty string)");
            if (shard.find('/') != std::string::npos || shard.find("..") != std::string::npos)
                throw WeightError(index + ": shard name '" + shard + "' leaves the folder");
            shards.insert(shard);
        }
        std::vector<std::string> out;
        for (const auto& s : shards) out.push_back(dir + "/" + s);
        return out;
    }
    const std::string fp16 = dir + "/" + stem + ".fp16.safetensors";
    if (is_file(fp16)) return {fp16};
    throw IoError(dir + ": no weights found (expected " + stem + ".safetensors or " + stem +
                  ".safetensors.index.json)");
}

std::string normalize_key(const std::string& key) {
    // transformers before v5 saved CLIPTextModel under "text_model." and kept the position_ids
    // buffer, which the module recomputes.
    static const std::string kTextModel = "text_model.";
    std::string k = key;
    if (k.rfind(kTextModel, 0) == 0) k = k.substr(kTextModel.size());
    if (k == "embeddings.position_ids") return "";
    return k;
}

torch::Tensor in_memory_format(const torch::Tensor& t, const LoadOptions& options) {
    if (options.channels_last && t.dim() == 4 && t.is_floating_point())
        return t.contiguous(at::MemoryFormat::ChannelsLast);
    return t;
}

void load_weights(torch::nn::Module& module, const std::vector<std::string>& files,
                  const LoadOptions& options) {
    check_load_options(options);
    if (files.empty()) throw WeightError("load_weights: no weight files given");
    std::map<std::string, torch::Tensor> targets;
    for (auto& p : module.named_parameters(/*recurse=*/true)) targets[p.key()] = p.value();
    for (auto& b : module.named_buffers(/*recurse=*/true)) targets[b.key()] = b.value();

    std::vector<std::string> unexpected, mis_shaped, duplicated;
    std::map<std::string, std::pair<SafeTensors, std::string>> found;  // module key -> (file, file key)
    std::vector<SafeTensors> opened;
    for (const auto& path : files) {
        SafeTensors st = SafeTensors::open(path);
        for (const auto& key : st.keys()) {
            const std::string mk = normalize_key(key);
            if (mk.empty()) continue;
            auto it = targets.find(mk);
            if (it == targets.end()) {
                unexpected.push_back("'" + key + "'");
                continue;
            }
            const TensorInfo& info = st.info(key);
            if (c10::IntArrayRef(info.shape) != it->second.sizes()) {
                mis_shaped.push_back("'" + key + "' has shape " + shape_str(info.shape) +
                                     ", the model expects " + shape_str(it->second.sizes()));
                continue;
            }
            if (!found.emplace(mk, std::make_pair(st, key)).second)
                duplicated.push_back("'" + key + "'");
        }
    }
    std::vector<std::string> missing;
    for (const auto& kv : targets)
        if (!found.count(kv.first) && !kv.first.empty()) {
            // BatchNorm's step counter is bookkeeping, not a weight.
            if (kv.first.size() >= 19 &&
                kv.first.compare(kv.first.size() - 19, 19, "num_batches_tracked") == 0)
                continue;
            missing.push_back("'" + kv.first + "'");
        }

    if (!missing.empty() || !unexpected.empty() || !mis_shaped.empty() || !duplicated.empty()) {
        std::ostringstream msg;
        msg << join_files(files) << ": weights do not match the model (" << missing.size()
            << " missing, " << unexpected.size() << " unexpected, " << mis_shaped.size()
            << " mis-shaped)";
        for (const auto& k : missing) msg << "\n  missing " << k;
        for (const auto& k : unexpected) msg << "\n  unexpected " << k;
        for (const auto& k : mis_shaped) msg << "\n  mis-shaped " << k;
        for (const auto& k : duplicated) msg << "\n  duplicated " << k;
        throw WeightError(msg.str());
    }

    torch::NoGradGuard no_grad;
    for (auto& [mk, src] : found) {
        torch::Tensor& dst = targets[mk];
        torch::Tensor value = src.first.tensor(src.second);
        const auto dtype = value.is_floating_point() ? options.dtype : value.scalar_type();
        // Cast on the CPU from the mapping, then one transfer; set_data keeps the registration.
        dst.set_data(in_memory_format(
            value.to(dtype).to(options.device, /*non_blocking=*/false, /*copy=*/true), options));
    }
}

namespace {
thread_local int uninitialized_depth = 0;
}  // namespace

UninitializedParameters::UninitializedParameters() { ++uninitialized_depth; }
UninitializedParameters::~UninitializedParameters() { --uninitialized_depth; }
bool UninitializedParameters::active() { return uninitialized_depth > 0; }

bool projects_text_kv(const LoadOptions& options, const torch::Device& device) {
    return options.project_text_kv.value_or(device.is_cpu());
}

void check_load_options(const LoadOptions& options) {
    const torch::ScalarType dtype = options.dtype;
    if (dtype != torch::kFloat32 && dtype != torch::kFloat16 && dtype != torch::kBFloat16 &&
        dtype != torch::kFloat64)
        throw InvalidArgument(std::string("LoadOptions: `dtype` must be float32, float16, "
                                          "bfloat16 or float64, got ") +
                              c10::toString(dtype));
    const torch::Device device = options.device;
    if (!device.is_cpu() && !device.is_cuda())
        throw InvalidArgument("LoadOptions: `device` must be the CPU or a CUDA device, got " +
                              device.str());
    if (device.is_cuda()) {
        const auto count = static_cast<int64_t>(torch::cuda::device_count());
        if (count == 0)
            throw InvalidArgument("LoadOptions: `device` " + device.str() +
                                  ": CUDA is not available (no GPU visible, or a libtorch "
                                  "without CUDA)");
        if (device.has_index() && device.index() >= count)
            throw InvalidArgument("LoadOptions: `device` " + device.str() + ": there are " +
                                  std::to_string(count) + " CUDA devices");
    }
}

void prepare_module(torch::nn::Module& module, const LoadOptions& options) {
    check_load_options(options);
    module.eval();
    torch::NoGradGuard no_grad;
    // Module::to(device, dtype) would also cast integer buffers (BatchNorm's step counter).
    for (auto& p : module.parameters()) {
        p.set_requires_grad(false);
        p.set_data(in_memory_format(
            p.is_floating_point() ? p.to(options.device, options.dtype) : p.to(options.device),
            options));
    }
    for (auto& b : module.buffers())
        b.set_data(b.is_floating_point() ? b.to(options.device, options.dtype) : b.to(options.device));
}

}  // namespace wuerstchen
