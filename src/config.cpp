#include "wuerstchen/config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "json_util.h"
#include "wuerstchen/error.h"

namespace wuerstchen {

namespace detail {

void config_fail(const std::string& source, const std::string& key, const std::string& what) {
    throw ConfigError(source + ": key '" + key + "' " + what);
}

nlohmann::json JsonFields::parse_object(const std::string& text, const std::string& source) {
    if (json_too_deep(text.data(), text.data() + text.size()))
        throw ConfigError(source + ": invalid JSON: nested deeper than " +
                          std::to_string(kMaxJsonDepth) + " levels");
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        throw ConfigError(source + ": invalid JSON: " + e.what());
    }
    if (!j.is_object()) throw ConfigError(source + ": expected a JSON object at the top level");
    return j;
}

void JsonFields::fail(const std::string& key, const std::string& what) const {
    config_fail(source_, key, what);
}

int JsonFields::to_int(const std::string& key, const nlohmann::json& v) const {
    // Unsigned first: get<int64_t>() would wrap values above INT64_MAX (2^64-1 became -1).
    if (v.is_number_unsigned()) {
        if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int>::max()))
            fail(key, "is out of range for an integer");
        return static_cast<int>(v.get<uint64_t>());
    }
    if (v.is_number_integer()) {
        const auto i = v.get<int64_t>();
        if (i < std::numeric_limits<int>::min() || i > std::numeric_limits<int>::max())
            fail(key, "is out of range for an integer");
        return static_cast<int>(i);
    }
    if (v.is_number_float()) {
        const double d = v.get<double>();
        if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 2147483647.0)
            return static_cast<int>(d);
    }
    fail(key, "must be an integer, got " + v.dump());
}

double JsonFields::to_double(const std::string& key, const nlohmann::json& v) const {
    if (!v.is_number()) fail(key, "must be a number, got " + v.dump());
    return v.get<double>();
}

bool JsonFields::to_bool(const std::string& key, const nlohmann::json& v) const {
    if (!v.is_boolean()) fail(key, "must be true or false, got " + v.dump());
    return v.get<bool>();
}

void JsonFields::get(const std::string& key, int& out) const {
    if (has(key)) out = to_int(key, at(key));
}
void JsonFields::get(const std::string& key, double& out) const {
    if (has(key)) out = to_double(key, at(key));
}
void JsonFields::get(const std::string& key, bool& out) const {
    if (has(key)) out = to_bool(key, at(key));
}
void JsonFields::get(const std::string& key, std::string& out) const {
    if (!has(key)) return;
    if (!at(key).is_string()) fail(key, "must be a string, got " + at(key).dump());
    out = at(key).get<std::string>();
}

namespace {
template <typename T, typename Conv>
void get_list(const JsonFields& f, const nlohmann::json& v, const std::string& key,
              std::vector<T>& out, Conv conv) {
    if (!v.is_array()) f.fail(key, "must be a list, got " + v.dump());
    std::vector<T> values;
    for (const auto& item : v) values.push_back(conv(item));
    out = std::move(values);
}
}  // namespace

void JsonFields::get(const std::string& key, std::vector<int>& out) const {
    if (has(key)) get_list(*this, at(key), key, out, [&](auto& x) { return to_int(key, x); });
}
void JsonFields::get(const std::string& key, std::vector<bool>& out) const {
    if (has(key)) get_list(*this, at(key), key, out, [&](auto& x) { return to_bool(key, x); });
}
void JsonFields::get(const std::string& key, std::vector<double>& out) const {
    if (has(key)) get_list(*this, at(key), key, out, [&](auto& x) { return to_double(key, x); });
}
void JsonFields::get(const std::string& key, std::vector<std::string>& out) const {
    if (!has(key)) return;
    get_list(*this, at(key), key, out, [&](const nlohmann::json& x) {
        if (!x.is_string()) fail(key, "must be a list of strings, got " + at(key).dump());
        return x.get<std::string>();
    });
}

}  // namespace detail

using detail::config_fail;
using detail::JsonFields;

std::string read_text_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw IoError(path + ": cannot open file");
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) throw IoError(path + ": read failed");
    return ss.str();
}

namespace {
void require_positive(const std::string& source, const std::string& key, double v) {
    if (!(v > 0)) config_fail(source, key, "must be positive, got " + std::to_string(v));
}
}  // namespace

// ---------------------------------------------------------------- CLIPTextConfig

CLIPTextConfig CLIPTextConfig::from_json_text(const std::string& json, const std::string& source) {
    const nlohmann::json root = JsonFields::parse_object(json, source);
    // A full CLIPConfig nests the text tower under "text_config".
    const nlohmann::json& j =
        root.contains("text_config") && root["text_config"].is_object() ? root["text_config"] : root;
    JsonFields f(j, source);
    CLIPTextConfig c;
    f.get("vocab_size", c.vocab_size);
    f.get("hidden_size", c.hidden_size);
    f.get("intermediate_size", c.intermediate_size);
    f.get("num_hidden_layers", c.num_hidden_layers);
    f.get("num_attention_heads", c.num_attention_heads);
    f.get("max_position_embeddings", c.max_position_embeddings);
    f.get("hidden_act", c.hidden_act);
    f.get("layer_norm_eps", c.layer_norm_eps);
    f.get("bos_token_id", c.bos_token_id);
    f.get("eos_token_id", c.eos_token_id);
    f.get("pad_token_id", c.pad_token_id);
    f.get("projection_dim", c.projection_dim);
    c.validate(source);
    return c;
}

CLIPTextConfig CLIPTextConfig::from_file(const std::string& path) {
    return from_json_text(read_text_file(path), path);
}

void CLIPTextConfig::validate(const std::string& source) const {
    require_positive(source, "vocab_size", vocab_size);
    require_positive(source, "hidden_size", hidden_size);
    require_positive(source, "intermediate_size", intermediate_size);
    require_positive(source, "num_hidden_layers", num_hidden_layers);
    require_positive(source, "num_attention_heads", num_attention_heads);
    require_positive(source, "max_position_embeddings", max_position_embeddings);
    require_positive(source, "layer_norm_eps", layer_norm_eps);
    if (hidden_size % num_attention_heads != 0)
        config_fail(source, "num_attention_heads",
                    "must divide hidden_size (" + std::to_string(hidden_size) + "), got " +
                        std::to_string(num_attention_heads));
    if (hidden_act != "gelu" && hidden_act != "quick_gelu" && hidden_act != "gelu_new" &&
        hidden_act != "gelu_pytorch_tanh")
        config_fail(source, "hidden_act",
                    "must be one of gelu, quick_gelu, gelu_new, gelu_pytorch_tanh, got '" +
                        hidden_act + "'");
}

// ---------------------------------------------------------------- PriorConfig

PriorConfig PriorConfig::from_json_text(const std::string& json, const std::string& source) {
    const nlohmann::json j = JsonFields::parse_object(json, source);
    JsonFields f(j, source);
    PriorConfig c;
    f.get("c_in", c.c_in);
    f.get("c", c.c);
    f.get("c_cond", c.c_cond);
    f.get("c_r", c.c_r);
    f.get("depth", c.depth);
    f.get("nhead", c.nhead);
    f.get("dropout", c.dropout);
    c.validate(source);
    return c;
}

PriorConfig PriorConfig::from_file(const std::string& path) {
    return from_json_text(read_text_file(path), path);
}

void PriorConfig::validate(const std::string& source) const {
    require_positive(source, "c_in", c_in);
    require_positive(source, "c", c);
    require_positive(source, "c_cond", c_cond);
    require_positive(source, "depth", depth);
    require_positive(source, "nhead", nhead);
    // gen_r_embedding divides by (c_r / 2 - 1).
    if (c_r < 4) config_fail(source, "c_r", "must be at least 4, got " + std::to_string(c_r));
    if (c % nhead != 0)
        config_fail(source, "nhead",
                    "must divide c (" + std::to_string(c) + "), got " + std::to_string(nhead));
}

// ---------------------------------------------------------------- DiffNeXtConfig

DiffNeXtConfig DiffNeXtConfig::from_json_text(const std::string& json, const std::string& source) {
    const nlohmann::json j = JsonFields::parse_object(json, source);
    JsonFields f(j, source);
    DiffNeXtConfig c;
    f.get("c_in", c.c_in);
    f.get("c_out", c.c_out);
    f.get("c_r", c.c_r);
    f.get("patch_size", c.patch_size);
    f.get("c_cond", c.c_cond);
    f.get("c_hidden", c.c_hidden);
    f.get("nhead", c.nhead);
    f.get("blocks", c.blocks);
    f.get("level_config", c.level_config);
    f.get("inject_effnet", c.inject_effnet);
    f.get("effnet_embd", c.effnet_embd);
    f.get("clip_embd", c.clip_embd);
    f.get("kernel_size", c.kernel_size);
    if (f.has("dropout")) {
        if (j.at("dropout").is_array()) {
            f.get("dropout", c.dropout);
        } else {
            double d = 0;
            f.get("dropout", d);
            c.dropout.assign(c.c_hidden.size(), d);
        }
    } else {
        c.dropout.assign(c.c_hidden.size(), 0.1);
    }
    c.validate(source);
    return c;
}

DiffNeXtConfig DiffNeXtConfig::from_file(const std::string& path) {
    return from_json_text(read_text_file(path), path);
}

void DiffNeXtConfig::validate(const std::string& source) const {
    require_positive(source, "c_in", c_in);
    require_positive(source, "c_out", c_out);
    require_positive(source, "patch_size", patch_size);
    require_positive(source, "c_cond", c_cond);
    require_positive(source, "effnet_embd", effnet_embd);
    require_positive(source, "clip_embd", clip_embd);
    if (c_r < 4) config_fail(source, "c_r", "must be at least 4, got " + std::to_string(c_r));
    if (kernel_size < 1 || kernel_size % 2 == 0)
        config_fail(source, "kernel_size",
                    "must be a positive odd number, got " + std::to_string(kernel_size));
    const size_t levels = c_hidden.size();
    if (levels == 0) config_fail(source, "c_hidden", "must list at least one level");
    auto same_len = [&](const std::string& key, size_t n) {
        if (n != levels)
            config_fail(source, key,
                        "must have one entry per level (" + std::to_string(levels) +
                            " from c_hidden), got " + std::to_string(n));
    };
    same_len("nhead", nhead.size());
    same_len("blocks", blocks.size());
    same_len("level_config", level_config.size());
    same_len("inject_effnet", inject_effnet.size());
    same_len("dropout", dropout.size());
    for (size_t i = 0; i < levels; ++i) {
        require_positive(source, "c_hidden", c_hidden[i]);
        if (blocks[i] < 0)
            config_fail(source, "blocks", "must not be negative, got " + std::to_string(blocks[i]));
        for (char t : level_config[i]) {
            if (t != 'C' && t != 'T' && t != 'A')
                config_fail(source, "level_config",
                            "has block type '" + std::string(1, t) +
                                "'; only C, T and A are supported");
            if (t == 'A' && (nhead[i] <= 0 || c_hidden[i] % nhead[i] != 0))
                config_fail(source, "nhead",
                            "level " + std::to_string(i) + " has attention blocks, so nhead (" +
                                std::to_string(nhead[i]) + ") must be positive and divide c_hidden (" +
                                std::to_string(c_hidden[i]) + ")");
        }
    }
}

// ---------------------------------------------------------------- PaellaVQConfig

PaellaVQConfig PaellaVQConfig::from_json_text(const std::string& json, const std::string& source) {
    const nlohmann::json j = JsonFields::parse_object(json, source);
    JsonFields f(j, source);
    PaellaVQConfig c;
    f.get("in_channels", c.in_channels);
    f.get("out_channels", c.out_channels);
    f.get("up_down_scale_factor", c.up_down_scale_factor);
    f.get("levels", c.levels);
    f.get("bottleneck_blocks", c.bottleneck_blocks);
    f.get("embed_dim", c.embed_dim);
    f.get("latent_channels", c.latent_channels);
    f.get("num_vq_embeddings", c.num_vq_embeddings);
    f.get("scale_factor", c.scale_factor);
    c.validate(source);
    return c;
}

PaellaVQConfig PaellaVQConfig::from_file(const std::string& path) {
    return from_json_text(read_text_file(path), path);
}

void PaellaVQConfig::validate(const std::string& source) const {
    require_positive(source, "in_channels", in_channels);
    require_positive(source, "out_channels", out_channels);
    require_positive(source, "up_down_scale_factor", up_down_scale_factor);
    require_positive(source, "levels", levels);
    require_positive(source, "bottleneck_blocks", bottleneck_blocks);
    require_positive(source, "latent_channels", latent_channels);
    require_positive(source, "num_vq_embeddings", num_vq_embeddings);
    require_positive(source, "scale_factor", scale_factor);
    if (levels > 16) config_fail(source, "levels", "must be at most 16, got " + std::to_string(levels));
    // Level widths are embed_dim / 2^i; each must stay a whole, positive channel count.
    if (embed_dim <= 0 || embed_dim % (1 << (levels - 1)) != 0)
        config_fail(source, "embed_dim",
                    "must be positive and divisible by 2^(levels-1), got " +
                        std::to_string(embed_dim));
}

// ---------------------------------------------------------------- SchedulerConfig

SchedulerConfig SchedulerConfig::from_json_text(const std::string& json, const std::string& source) {
    const nlohmann::json j = JsonFields::parse_object(json, source);
    JsonFields f(j, source);
    SchedulerConfig c;
    f.get("scaler", c.scaler);
    f.get("s", c.s);
    c.validate(source);
    return c;
}

SchedulerConfig SchedulerConfig::from_file(const std::string& path) {
    return from_json_text(read_text_file(path), path);
}

void SchedulerConfig::validate(const std::string& source) const {
    require_positive(source, "scaler", scaler);
    if (!(s >= 0) || !std::isfinite(s))
        config_fail(source, "s", "must be a finite non-negative number, got " + std::to_string(s));
}

// ---------------------------------------------------------------- ModelIndex

ModelIndex ModelIndex::from_json_text(const std::string& json, const std::string& source) {
    const nlohmann::json j = JsonFields::parse_object(json, source);
    JsonFields f(j, source);
    ModelIndex m;
    f.get("_class_name", m.class_name);
    f.get("latent_mean", m.latent_mean);
    f.get("latent_std", m.latent_std);
    f.get("resolution_multiple", m.resolution_multiple);
    f.get("latent_dim_scale", m.latent_dim_scale);
    for (auto it = j.begin(); it != j.end(); ++it) {
        const auto& v = it.value();
        // Components are ["library", "Class"] pairs; a null pair marks an absent component.
        if (!v.is_array() || it.key().empty() || it.key()[0] == '_') continue;
        if (v.size() == 2 && (v[0].is_null() || v[1].is_null())) continue;
        std::vector<std::string> pair;
        f.get(it.key(), pair);
        if (pair.size() != 2) config_fail(source, it.key(), "must be a [library, class] pair");
        m.components[it.key()] = pair;
    }
    m.validate(source);
    return m;
}

ModelIndex ModelIndex::from_file(const std::string& path) {
    return from_json_text(read_text_file(path), path);
}

void ModelIndex::validate(const std::string& source) const {
    if (!std::isfinite(latent_mean))
        config_fail(source, "latent_mean", "must be finite");
    if (!std::isfinite(latent_std)) config_fail(source, "latent_std", "must be finite");
    require_positive(source, "resolution_multiple", resolution_multiple);
    require_positive(source, "latent_dim_scale", latent_dim_scale);
}

}  // namespace wuerstchen
