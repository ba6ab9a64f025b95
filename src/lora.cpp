#include "wuerstchen/lora.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/nn/modules/container/sequential.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

#include "module_walk.h"
#include "nn/functional.h"
#include "nn/init.h"
#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/safetensors.h"

namespace wuerstchen {

namespace {

constexpr const char* kLoraFileName = "pytorch_lora_weights.safetensors";
constexpr const char* kMetadataKey =
    "lora_adapter_metadata";  // diffusers' LORA_ADAPTER_METADATA_KEY

[[noreturn]] void invalid(const std::string& what) { throw InvalidArgument("LoRA: " + what); }

bool starts_with(const std::string& s, const std::string& prefix) {
    return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
    return out;
}

std::string quoted_list(const std::vector<std::string>& items) {
    std::vector<std::string> q;
    for (const auto& s : items) q.push_back("'" + s + "'");
    return q.empty() ? "none" : join(q, ", ");
}

// Every LoraLinear of a module tree with its path ("blocks.2.attention.to_q").
std::vector<std::pair<std::string, LoraLinearImpl*>> lora_layers(torch::nn::Module& module) {
    std::vector<std::pair<std::string, LoraLinearImpl*>> out;
    for (const auto& item : module.named_modules("", /*include_self=*/false))
        if (auto* layer = dynamic_cast<LoraLinearImpl*>(item.value().get()))
            out.emplace_back(item.key(), layer);
    return out;
}

std::vector<LoraLinearImpl*> all_layers(const std::vector<torch::nn::Module*>& modules) {
    // lora_layers' order, without building the paths (place_lora_adapters runs per call).
    std::vector<LoraLinearImpl*> out;
    for (auto* root : modules)
        if (root != nullptr)
            visit_modules(*root, [&](torch::nn::Module& m) {
                if (&m == root) return false;  // lora_layers leaves the root out
                if (auto* layer = dynamic_cast<LoraLinearImpl*>(&m)) out.push_back(layer);
                return false;
            });
    return out;
}

void check_known(const std::vector<torch::nn::Module*>& modules,
                 const std::vector<std::string>& names) {
    const auto loaded = lora_adapter_names(modules);
    std::set<std::string> seen;
    for (const auto& name : names) {
        if (std::find(loaded.begin(), loaded.end(), name) == loaded.end())
            invalid("unknown adapter '" + name + "' (loaded: " + quoted_list(loaded) + ")");
        if (!seen.insert(name).second) invalid("adapter '" + name + "' is named twice");
    }
}

template <typename T>
T most_common(const std::vector<T>& values) {
    std::map<T, int> counts;
    for (const auto& v : values) ++counts[v];
    T best = values.front();
    int best_count = 0;
    for (const auto& v : values)  // first of the most frequent values, in order of appearance
        if (counts[v] > best_count) best = v, best_count = counts[v];
    return best;
}

// ------------------------------------------------------------------------------ key parsing

enum class Part { Down, Up, Alpha };

// One targeted layer, as the file describes it.
struct Entry {
    size_t target = 0;
    std::string module;  // module path (dots), or the underscore name of kohya's A1111 keys
    bool underscore = false;
    torch::Tensor down, up;
    std::optional<double> alpha;
    std::string down_key, up_key, alpha_key;
    LoraLinearImpl* layer = nullptr;  // resolved
    std::string path;                 // resolved module path
    double final_alpha = 0.0;
    bool rslora = false;

    const std::string& some_key() const {
        return !down_key.empty() ? down_key : !up_key.empty() ? up_key : alpha_key;
    }
};

// Suffixes, most specific first. The generic ".down.weight" / ".up.weight" are only taken for the
// attention-processor layout (".processor.to_q_lora.down.weight").
const std::vector<std::pair<std::string, Part>>& suffixes() {
    static const std::vector<std::pair<std::string, Part>> k = {
        {".lora_A.weight", Part::Down},
        {".lora_B.weight", Part::Up},
        {".lora_down.weight", Part::Down},
        {".lora_up.weight", Part::Up},
        {".lora_linear_layer.down.weight", Part::Down},
        {".lora_linear_layer.up.weight", Part::Up},
        {".lora.down.weight", Part::Down},
        {".lora.up.weight", Part::Up},
        {".down.weight", Part::Down},
        {".up.weight", Part::Up},
        {".alpha", Part::Alpha},
    };
    return k;
}

// diffusers' old attention-processor names: "<attn>.processor.to_q_lora" -> "<attn>.to_q".
std::optional<std::string> processor_module(const std::string& stem) {
    static const std::vector<std::pair<std::string, std::string>> k = {
        {".processor.to_q_lora", ".to_q"},
        {".processor.to_k_lora", ".to_k"},
        {".processor.to_v_lora", ".to_v"},
        {".processor.to_out_lora", ".to_out.0"},
    };
    for (const auto& [from, to] : k)
        if (ends_with(stem, from)) return stem.substr(0, stem.size() - from.size()) + to;
    return std::nullopt;
}

std::string underscored(std::string s) {
    std::replace(s.begin(), s.end(), '.', '_');
    return s;
}

// The alpha settings of diffusers' lora_adapter_metadata for one prefix (peft LoraConfig kwargs).
struct ConfigAlpha {
    double lora_alpha = 8.0;  // peft's LoraConfig default
    std::vector<std::pair<std::string, double>> alpha_pattern;
    bool rslora = false;
};

// peft matches pattern keys against module names as "(.*\.)?key$"; keys are taken literally here.
bool pattern_matches(const std::string& module, const std::string& key) {
    return module == key || ends_with(module, "." + key);
}

std::map<std::string, ConfigAlpha> parse_metadata(const SafeTensors& file,
                                                  const std::vector<LoraTarget>& targets) {
    std::map<std::string, ConfigAlpha> out;
    const auto& meta = file.metadata();
    const auto it = meta.find(kMetadataKey);
    if (it == meta.end()) return out;
    const std::string where = file.path() + ": metadata '" + kMetadataKey + "'";
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(it->second);
    } catch (const std::exception& e) {
        throw WeightError(where + " is not valid JSON: " + e.what());
    }
    if (!j.is_object()) throw WeightError(where + " is not a JSON object");
    for (const auto& t : targets) {
        const std::string p = t.prefix + ".";
        bool any = false;
        ConfigAlpha c;
        for (auto kv = j.begin(); kv != j.end(); ++kv) {
            if (!starts_with(kv.key(), p)) continue;
            any = true;
            const std::string field = kv.key().substr(p.size());
            const auto& v = kv.value();
            if (field == "lora_alpha") {
                if (!v.is_number())
                    throw WeightError(where + ": '" + kv.key() + "' is not a number");
                c.lora_alpha = v.get<double>();
            } else if (field == "alpha_pattern") {
                if (!v.is_object() && !v.is_null())
                    throw WeightError(where + ": '" + kv.key() + "' is not an object");
                if (v.is_object())
                    for (auto a = v.begin(); a != v.end(); ++a) {
                        if (!a.value().is_number())
                            throw WeightError(where + ": '" + kv.key() + "." + a.key() +
                                              "' is not a number");
                        c.alpha_pattern.emplace_back(a.key(), a.value().get<double>());
                    }
            } else if (field == "use_rslora") {
                if (!v.is_boolean())
                    throw WeightError(where + ": '" + kv.key() + "' is not a bool");
                c.rslora = v.get<bool>();
            }
        }
        if (any) out[t.prefix] = c;
    }
    return out;
}

std::string resolve_file(const std::string& path) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) {
        const std::string f = path + "/" + kLoraFileName;
        if (!std::filesystem::exists(f, ec))
            throw IoError(path + ": no " + kLoraFileName + " in this folder");
        return f;
    }
    if (!std::filesystem::exists(path, ec)) throw IoError(path + ": no such LoRA file or folder");
    return path;
}

// Reads, groups and resolves every key; throws one WeightError listing all problems.
std::vector<Entry> read_entries(const SafeTensors& file, const std::vector<LoraTarget>& targets) {
    const std::string& fname = file.path();
    std::vector<std::string> errors;
    auto fail = [&](const std::string& msg) { errors.push_back(msg); };

    // Legacy files carry no component prefix at all: then every key is the first target's.
    const auto keys = file.keys();
    bool any_prefixed = false;
    for (const auto& key : keys)
        for (const auto& t : targets) {
            if (starts_with(key, t.prefix + ".")) any_prefixed = true;
            for (const auto& kp : t.kohya_prefixes)
                if (starts_with(key, kp + "_")) any_prefixed = true;
        }

    std::map<std::tuple<size_t, std::string, bool>, Entry> grouped;
    for (const auto& key : keys) {
        // diffusers drops kohya's DoRA scales with a warning; peft's DoRA cannot be applied.
        if (key.find("dora_scale") != std::string::npos) continue;
        if (key.find("lora_magnitude_vector") != std::string::npos) {
            fail("'" + key + "': DoRA is not supported");
            continue;
        }
        std::string stem;
        Part part = Part::Alpha;
        bool found = false;
        for (const auto& [suffix, p] : suffixes())
            if (ends_with(key, suffix)) {
                stem = key.substr(0, key.size() - suffix.size());
                part = p;
                found = true;
                // The generic suffixes only in the attention-processor layout.
                if (suffix == ".down.weight" || suffix == ".up.weight") {
                    const auto m = processor_module(stem);
                    found = m.has_value();
                    if (found) stem = *m;
                }
                break;
            }
        if (!found) {
            fail("'" + key +
                 "' is not a LoRA tensor (expected <module>.lora_A.weight / lora_B.weight, "
                 "lora_down.weight / lora_up.weight or alpha)");
            continue;
        }

        std::optional<size_t> target;
        std::string module;
        bool underscore = false;
        for (size_t i = 0; i < targets.size() && !target; ++i) {
            const auto& t = targets[i];
            if (starts_with(stem, t.prefix + ".")) {
                target = i;
                module = stem.substr(t.prefix.size() + 1);
            } else {
                for (const auto& kp : t.kohya_prefixes)
                    if (starts_with(stem, kp + "_")) {
                        target = i;
                        module = stem.substr(kp.size() + 1);
                        underscore = true;
                        break;
                    }
            }
        }
        if (!target && !any_prefixed && !targets.empty()) {
            target = 0;
            module = stem;
        }
        if (!target) {
            std::vector<std::string> expected;
            for (const auto& t : targets) {
                expected.push_back(t.prefix + ".");
                for (const auto& kp : t.kohya_prefixes) expected.push_back(kp + "_");
            }
            fail("'" + key + "' matches no module: expected a key starting with " +
                 quoted_list(expected));
            continue;
        }
        const auto& t = targets[*target];
        const std::string legacy =
            underscore ? underscored(t.legacy_module_prefix) : t.legacy_module_prefix;
        if (!legacy.empty() && starts_with(module, legacy)) module = module.substr(legacy.size());

        Entry& e = grouped[{*target, module, underscore}];
        e.target = *target;
        e.module = module;
        e.underscore = underscore;
        std::string* slot = part == Part::Down ? &e.down_key
                            : part == Part::Up ? &e.up_key
                                               : &e.alpha_key;
        if (!slot->empty()) {
            fail("'" + key + "' and '" + *slot + "' are the same LoRA tensor");
            continue;
        }
        *slot = key;
        const torch::Tensor tensor = file.tensor(key);
        if (part == Part::Down) {
            e.down = tensor;
        } else if (part == Part::Up) {
            e.up = tensor;
        } else if (tensor.numel() != 1) {
            fail("'" + key + "' has shape " + shape_string(tensor.sizes()) + ", expected a scalar");
        } else {
            const double a = tensor.to(torch::kFloat64).item<double>();
            if (!std::isfinite(a))
                fail("'" + key + "' is not finite");
            else
                e.alpha = a;
        }
    }

    // Resolve the module paths against each target's tree.
    struct Tree {
        std::map<std::string, LoraLinearImpl*> layers;
        std::map<std::string, std::string> underscore;  // "" when ambiguous
        std::map<std::string, std::string> other;       // non-LoRA modules: path -> type name
    };
    std::vector<Tree> trees(targets.size());
    for (size_t i = 0; i < targets.size(); ++i) {
        if (targets[i].module == nullptr) continue;
        for (const auto& [path, layer] : lora_layers(*targets[i].module)) {
            trees[i].layers[path] = layer;
            auto [it, inserted] = trees[i].underscore.emplace(underscored(path), path);
            if (!inserted) it->second.clear();
        }
        for (const auto& item : targets[i].module->named_modules("", false))
            if (!trees[i].layers.count(item.key()))
                trees[i].other[item.key()] = item.value()->name();
    }

    std::vector<Entry> out;
    std::map<LoraLinearImpl*, std::string> claimed;
    for (auto& [id, e] : grouped) {
        const auto& t = targets[e.target];
        const auto& tree = trees[e.target];
        const std::string& any_key = e.some_key();
        if (e.underscore) {
            const auto it = tree.underscore.find(e.module);
            if (it == tree.underscore.end()) {
                fail("'" + any_key + "' matches no Linear layer of " + t.prefix + " (no module '" +
                     e.module + "' with dots as underscores)");
                continue;
            }
            if (it->second.empty()) {
                fail("'" + any_key + "' is ambiguous: several " + t.prefix + " layers read '" +
                     e.module + "' with dots as underscores");
                continue;
            }
            e.path = it->second;
        } else {
            e.path = e.module;
        }
        const auto layer_it = tree.layers.find(e.path);
        if (layer_it == tree.layers.end()) {
            const auto other = tree.other.find(e.path);
            if (other != tree.other.end())
                fail("'" + any_key + "': " + t.prefix + " module '" + e.path + "' is a " +
                     other->second + "; LoRA applies to Linear layers only");
            else
                fail("'" + any_key + "' matches no module: " + t.prefix + " has no layer '" +
                     e.path + "'");
            continue;
        }
        e.layer = layer_it->second;
        if (e.down_key.empty() || e.up_key.empty()) {
            fail(e.down_key.empty() ? "'" + any_key + "' has no lora_A / lora_down partner for " +
                                          t.prefix + " layer '" + e.path + "'"
                                    : "'" + e.down_key + "' has no lora_B / lora_up partner");
            continue;
        }
        if (e.down.dim() != 2 || e.up.dim() != 2) {
            const bool down_bad = e.down.dim() != 2;
            fail("'" + (down_bad ? e.down_key : e.up_key) + "' has shape " +
                 shape_string((down_bad ? e.down : e.up).sizes()) +
                 ", expected a matrix (LoRA on Linear layers)");
            continue;
        }
        if (e.down.size(0) != e.up.size(1) || e.down.size(0) < 1) {
            fail("rank mismatch: '" + e.down_key + "' " + shape_string(e.down.sizes()) +
                 " has rank " + std::to_string(e.down.size(0)) + " but '" + e.up_key + "' " +
                 shape_string(e.up.sizes()) + " has rank " + std::to_string(e.up.size(1)));
            continue;
        }
        const int64_t in = e.layer->weight.size(1), outf = e.layer->weight.size(0);
        const std::string linear = t.prefix + " layer '" + e.path + "' is Linear(" +
                                   std::to_string(in) + " -> " + std::to_string(outf) + ")";
        if (e.down.size(1) != in) {
            fail("'" + e.down_key + "' has shape " + shape_string(e.down.sizes()) + " but " +
                 linear + ": expected [rank, " + std::to_string(in) + "]");
            continue;
        }
        if (e.up.size(0) != outf) {
            fail("'" + e.up_key + "' has shape " + shape_string(e.up.sizes()) + " but " + linear +
                 ": expected [" + std::to_string(outf) + ", rank]");
            continue;
        }
        auto [c, inserted] = claimed.emplace(e.layer, e.down_key);
        if (!inserted) {
            fail("'" + e.down_key + "' and '" + c->second + "' target the same layer '" + t.prefix +
                 "." + e.path + "'");
            continue;
        }
        out.push_back(e);
    }
    if (out.empty() && errors.empty()) fail("no LoRA tensors in the file");
    if (!errors.empty()) {
        constexpr size_t kMax = 20;
        std::string msg = fname + ": ";
        for (size_t i = 0; i < errors.size() && i < kMax; ++i) msg += (i ? "; " : "") + errors[i];
        if (errors.size() > kMax)
            msg += "; and " + std::to_string(errors.size() - kMax) + " more problems";
        throw WeightError(msg);
    }

    // Alphas, per target as diffusers builds one LoraConfig per component: the file's metadata;
    // else kohya alphas (layers without one take the most common alpha, get_peft_kwargs);
    // else alpha = rank (scaling 1).
    const auto config = parse_metadata(file, targets);
    for (size_t i = 0; i < targets.size(); ++i) {
        std::vector<double> alphas;
        std::string alpha_key;
        for (const auto& e : out)
            if (e.target == i && e.alpha) alphas.push_back(*e.alpha), alpha_key = e.alpha_key;
        const auto meta = config.find(targets[i].prefix);
        if (meta != config.end() && !alphas.empty())
            throw WeightError(fname + ": '" + alpha_key + "' and metadata '" + kMetadataKey +
                              "' both set " + targets[i].prefix +
                              " alphas (diffusers refuses both as well)");
        for (auto& e : out) {
            if (e.target != i) continue;
            if (meta != config.end()) {
                const std::string peft_name = targets[i].legacy_module_prefix + e.path;
                e.final_alpha = meta->second.lora_alpha;
                for (const auto& [key, value] : meta->second.alpha_pattern)
                    if (pattern_matches(e.path, key) || pattern_matches(peft_name, key)) {
                        e.final_alpha = value;
                        break;
                    }
                e.rslora = meta->second.rslora;
            } else if (e.alpha) {
                e.final_alpha = *e.alpha;
            } else if (!alphas.empty()) {
                e.final_alpha = most_common(alphas);
            } else {
                e.final_alpha = static_cast<double>(e.down.size(0));
            }
        }
    }
    return out;
}

}  // namespace

// ------------------------------------------------------------------------------ LoraAdapter

double LoraAdapter::base_scaling() const {
    const double r = static_cast<double>(rank());
    return rslora ? alpha / std::sqrt(r) : alpha / r;
}

// ------------------------------------------------------------------------------ LoraLinearImpl

LoraLinearImpl::LoraLinearImpl(int64_t in_features, int64_t out_features)
    : LoraLinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}

LoraLinearImpl::LoraLinearImpl(const torch::nn::LinearOptions& options)
    : torch::nn::LinearImpl(nn::base_options(options)) {
    nn::finish_linear(*this, options);
}

void LoraLinearImpl::place(LoraAdapter& a) const {
    const auto device = weight.device();
    const auto dtype = weight.scalar_type();
    if (a.down.device() != device || a.down.scalar_type() != dtype)
        a.down = a.down.to(device, dtype);
    if (a.up.device() != device || a.up.scalar_type() != dtype) a.up = a.up.to(device, dtype);
}

torch::Tensor LoraLinearImpl::forward(const torch::Tensor& input) {
    auto out = nn::linear_forward(input, weight, bias);
    if (!enabled_) return out;
    for (auto& a : adapters_) {
        if (!a.active || a.merged || a.weight == 0.0) continue;
        place(a);
        // peft: lora_B(lora_A(x)) * scaling, with x cast to the adapter's dtype.
        const auto x =
            input.scalar_type() == a.down.scalar_type() ? input : input.to(a.down.scalar_type());
        const auto delta = at::linear(at::linear(x, a.down), a.up) * a.scaling();
        out = out + delta.to(out.scalar_type());
    }
    return out;
}

void LoraLinearImpl::add_adapter(const std::string& name, const torch::Tensor& down,
                                 const torch::Tensor& up, double alpha, double weight_,
                                 bool rslora) {
    if (name.empty()) invalid("an adapter name must not be empty");
    if (has_adapter(name)) invalid("adapter '" + name + "' is already loaded in this layer");
    if (!std::isfinite(alpha) || !std::isfinite(weight_))
        invalid("adapter '" + name + "': alpha and weight must be finite");
    const int64_t in = weight.size(1), outf = weight.size(0);
    if (!down.defined() || !up.defined() || down.dim() != 2 || up.dim() != 2 ||
        down.size(1) != in || up.size(0) != outf || down.size(0) != up.size(1) || down.size(0) < 1)
        invalid("adapter '" + name + "': lora_A " +
                (down.defined() ? shape_string(down.sizes()) : "undefined") + " / lora_B " +
                (up.defined() ? shape_string(up.sizes()) : "undefined") + " do not fit Linear(" +
                std::to_string(in) + " -> " + std::to_string(outf) + "): expected [rank, " +
                std::to_string(in) + "] / [" + std::to_string(outf) + ", rank]");
    LoraAdapter a;
    a.name = name;
    // Own copies (a safetensors tensor is a view of the read-only mapping).
    const auto opts = torch::TensorOptions().device(weight.device()).dtype(weight.scalar_type());
    a.down = down.detach().to(opts, /*non_blocking=*/false, /*copy=*/true);
    a.up = up.detach().to(opts, /*non_blocking=*/false, /*copy=*/true);
    a.alpha = alpha;
    a.rslora = rslora;
    a.weight = weight_;
    adapters_.push_back(std::move(a));
}

void LoraLinearImpl::delete_adapter(const std::string& name) {
    for (auto it = adapters_.begin(); it != adapters_.end(); ++it) {
        if (it->name != name) continue;
        if (it->merged) invalid("adapter '" + name + "' is fused: call unfuse_lora() first");
        adapters_.erase(it);
        return;
    }
}

void LoraLinearImpl::clear_adapters() {
    adapters_.clear();
    original_weight_ = torch::Tensor();
}

bool LoraLinearImpl::has_adapter(const std::string& name) const {
    return std::any_of(adapters_.begin(), adapters_.end(),
                       [&](const LoraAdapter& a) { return a.name == name; });
}

LoraAdapter& LoraLinearImpl::adapter(const std::string& name) {
    for (auto& a : adapters_)
        if (a.name == name) return a;
    invalid("adapter '" + name + "' is not loaded in this layer");
}

void LoraLinearImpl::fuse(double lora_scale, const std::vector<std::string>& names) {
    if (!std::isfinite(lora_scale)) invalid("lora_scale must be finite");
    std::vector<LoraAdapter*> todo;
    for (auto& a : adapters_) {
        if (a.merged) continue;
        const bool chosen =
            names.empty() ? a.active : std::find(names.begin(), names.end(), a.name) != names.end();
        if (chosen) todo.push_back(&a);
    }
    if (todo.empty()) return;
    // set_data refuses inference tensors: compute outside InferenceMode (as OffloadGuard does).
    c10::InferenceMode not_inference(/*enabled=*/false);
    torch::NoGradGuard no_grad;
    auto w = weight.detach().to(torch::kFloat32);
    for (auto* a : todo) {
        place(*a);
        // peft's get_delta_weight: B @ A * scaling (times diffusers' lora_scale), here in fp32.
        w = w + at::matmul(a->up.to(torch::kFloat32), a->down.to(torch::kFloat32)) *
                    (lora_scale * a->scaling());
        a->merged = true;
    }
    // The first fuse keeps the weight tensor itself: set_data swaps the parameter's storage, so
    // the original stays untouched for a bit-exact unfuse.
    if (!original_weight_.defined()) original_weight_ = weight.detach();
    weight.set_data(w.to(weight.scalar_type()));
}

void LoraLinearImpl::unfuse() {
    if (!original_weight_.defined()) return;
    c10::InferenceMode not_inference(/*enabled=*/false);
    torch::NoGradGuard no_grad;
    auto w = original_weight_;
    if (w.device() != weight.device() || w.scalar_type() != weight.scalar_type())
        w = w.to(weight.device(), weight.scalar_type());
    weight.set_data(w);
    original_weight_ = torch::Tensor();
    for (auto& a : adapters_) a.merged = false;
}

// ------------------------------------------------------------------------------ helpers

torch::Tensor lora_forward(const torch::nn::Linear& layer, const torch::Tensor& x) {
    // ptr(): the holder is const, the module is not (forward is non-const).
    const auto& impl = layer.ptr();
    if (auto* lora = dynamic_cast<LoraLinearImpl*>(impl.get())) return lora->forward(x);
    return impl->forward(x);
}

torch::nn::Linear make_lora_linear(int64_t in_features, int64_t out_features, bool bias) {
    // Through shared_ptr<LinearImpl>: ModuleHolder's forwarding constructor would take the
    // derived pointer as a LinearImpl constructor argument.
    std::shared_ptr<torch::nn::LinearImpl> impl = std::make_shared<LoraLinearImpl>(
        torch::nn::LinearOptions(in_features, out_features).bias(bias));
    return torch::nn::Linear(std::move(impl));
}

std::vector<LoraTarget> prior_pipeline_lora_targets(torch::nn::Module& prior,
                                                    torch::nn::Module& text_encoder) {
    return {LoraTarget{"prior", &prior, {"lora_unet", "lora_prior"}, ""},
            LoraTarget{"text_encoder", &text_encoder, {"lora_te", "lora_te1"}, "text_model."}};
}

// ------------------------------------------------------------------------------ load / save

int load_lora_adapter(const std::string& path, const std::vector<LoraTarget>& targets,
                      const std::string& adapter_name, double scale) {
    if (!std::isfinite(scale)) invalid("scale must be finite, got " + std::to_string(scale));
    std::vector<torch::nn::Module*> modules;
    for (const auto& t : targets) modules.push_back(t.module);
    const auto loaded = lora_adapter_names(modules);
    std::string name = adapter_name;
    if (name.empty()) name = "default_" + std::to_string(loaded.size());
    if (std::find(loaded.begin(), loaded.end(), name) != loaded.end())
        invalid("adapter '" + name +
                "' is already loaded: pass another adapter name, or delete / unload it first");

    const SafeTensors file = SafeTensors::open(resolve_file(path));
    const auto entries = read_entries(file, targets);

    std::vector<LoraLinearImpl*> done;
    try {
        for (const auto& e : entries) {
            e.layer->add_adapter(name, e.down, e.up, e.final_alpha, scale, e.rslora);
            done.push_back(e.layer);
        }
    } catch (...) {
        for (auto* layer : done) layer->delete_adapter(name);
        throw;
    }
    return static_cast<int>(entries.size());
}

void save_lora_adapter(const std::string& path, const std::vector<LoraTarget>& targets,
                       const std::string& adapter_name) {
    std::vector<torch::nn::Module*> modules;
    for (const auto& t : targets) modules.push_back(t.module);
    const auto loaded = lora_adapter_names(modules);
    std::string name = adapter_name;
    if (name.empty()) {
        if (loaded.size() != 1)
            invalid(loaded.empty() ? "no adapter is loaded: nothing to save"
                                   : "several adapters are loaded (" + quoted_list(loaded) +
                                         "): name the one to save");
        name = loaded.front();
    } else {
        check_known(modules, {name});
    }

    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    nlohmann::json meta = nlohmann::json::object();
    bool need_meta = false;
    for (const auto& t : targets) {
        if (t.module == nullptr) continue;
        std::vector<std::string> names;
        std::vector<int64_t> ranks;
        std::vector<double> alphas;
        bool rslora = false;
        for (const auto& [p, layer] : lora_layers(*t.module)) {
            if (!layer->has_adapter(name)) continue;
            const auto& a = layer->adapter(name);
            const std::string module = t.legacy_module_prefix + p;
            const std::string key = t.prefix + "." + module;
            tensors.emplace_back(key + ".lora_A.weight", a.down.contiguous());
            tensors.emplace_back(key + ".lora_B.weight", a.up.contiguous());
            names.push_back(module);
            ranks.push_back(a.rank());
            alphas.push_back(a.alpha);
            rslora = rslora || a.rslora;
            need_meta = need_meta || a.rslora || a.alpha != static_cast<double>(a.rank());
        }
        if (names.empty()) continue;
        // peft LoraConfig kwargs, as diffusers packs them: "<prefix>.<field>".
        const int64_t r = most_common(ranks);
        const double lora_alpha = most_common(alphas);
        nlohmann::json rank_pattern = nlohmann::json::object();
        nlohmann::json alpha_pattern = nlohmann::json::object();
        for (size_t i = 0; i < names.size(); ++i) {
            if (ranks[i] != r) rank_pattern[names[i]] = ranks[i];
            if (alphas[i] != lora_alpha) alpha_pattern[names[i]] = alphas[i];
        }
        meta[t.prefix + ".r"] = r;
        meta[t.prefix + ".lora_alpha"] = lora_alpha;
        meta[t.prefix + ".rank_pattern"] = rank_pattern;
        meta[t.prefix + ".alpha_pattern"] = alpha_pattern;
        meta[t.prefix + ".target_modules"] = names;
        meta[t.prefix + ".use_rslora"] = rslora;
    }

    std::string file = path;
    std::error_code ec;
    if (!ends_with(path, ".safetensors")) {
        std::filesystem::create_directories(path, ec);
        if (ec) throw IoError(path + ": cannot create folder: " + ec.message());
        file = path + "/" + kLoraFileName;
    }
    std::map<std::string, std::string> metadata = {{"format", "pt"}};
    // Only when the scaling is not 1 everywhere: the training scripts' files carry none.
    if (need_meta) metadata[kMetadataKey] = meta.dump(2);
    save_safetensors(file, tensors, metadata);
}

// ------------------------------------------------------------------------------ model-level

std::vector<std::string> lora_adapter_names(const std::vector<torch::nn::Module*>& modules) {
    std::vector<std::string> names;
    for (auto* layer : all_layers(modules))
        for (const auto& a : layer->adapters())
            if (std::find(names.begin(), names.end(), a.name) == names.end())
                names.push_back(a.name);
    return names;
}

void set_lora_adapters(const std::vector<torch::nn::Module*>& modules,
                       const std::vector<std::string>& names, const std::vector<double>& weights) {
    check_known(modules, names);
    if (!weights.empty() && weights.size() != 1 && weights.size() != names.size())
        invalid("set_adapters got " + std::to_string(names.size()) + " adapter names but " +
                std::to_string(weights.size()) + " weights");
    for (double w : weights)
        if (!std::isfinite(w)) invalid("adapter weights must be finite");
    auto weight_of = [&](size_t i) {
        return weights.empty() ? 1.0 : weights.size() == 1 ? weights[0] : weights[i];
    };
    for (auto* layer : all_layers(modules))
        for (const auto& a : layer->adapters()) {
            auto& adapter = layer->adapter(a.name);
            const auto it = std::find(names.begin(), names.end(), a.name);
            adapter.active = it != names.end();
            if (adapter.active) adapter.weight = weight_of(static_cast<size_t>(it - names.begin()));
        }
}

void fuse_lora(const std::vector<torch::nn::Module*>& modules, double lora_scale,
               const std::vector<std::string>& names) {
    check_known(modules, names);
    if (!std::isfinite(lora_scale)) invalid("lora_scale must be finite");
    for (auto* layer : all_layers(modules)) layer->fuse(lora_scale, names);
}

void unfuse_lora(const std::vector<torch::nn::Module*>& modules) {
    for (auto* layer : all_layers(modules)) layer->unfuse();
}

void LoraLinearImpl::place_adapters() {
    for (auto& a : adapters_) place(a);
}

void place_lora_adapters(const std::vector<torch::nn::Module*>& modules) {
    for (auto* layer : all_layers(modules)) layer->place_adapters();
}

void set_lora_enabled(const std::vector<torch::nn::Module*>& modules, bool enabled) {
    for (auto* layer : all_layers(modules)) layer->set_lora_enabled(enabled);
}

void delete_lora_adapters(const std::vector<torch::nn::Module*>& modules,
                          const std::vector<std::string>& names) {
    check_known(modules, names);
    const auto layers = all_layers(modules);
    for (auto* layer : layers)  // all checks first: nothing is deleted when one is fused
        for (const auto& a : layer->adapters())
            if (a.merged && std::find(names.begin(), names.end(), a.name) != names.end())
                invalid("adapter '" + a.name + "' is fused: call unfuse_lora() first");
    for (auto* layer : layers)
        for (const auto& name : names) layer->delete_adapter(name);
}

void unload_lora(const std::vector<torch::nn::Module*>& modules) {
    for (auto* layer : all_layers(modules)) layer->clear_adapters();
}

}  // namespace wuerstchen
