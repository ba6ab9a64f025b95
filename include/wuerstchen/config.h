#pragma once

// Plain config structs whose fields are the keys of the upstream config.json files, with
// diffusers' / transformers' defaults for absent keys. from_file() names the file in every
// ConfigError; validate() checks the invariants the modules rely on.

#include <map>
#include <string>
#include <vector>

namespace wuerstchen {

// transformers CLIPTextConfig (text_encoder/config.json). A combined CLIPConfig with a
// "text_config" object is accepted too.
struct CLIPTextConfig {
    int vocab_size = 49408;
    int hidden_size = 512;
    int intermediate_size = 2048;
    int num_hidden_layers = 12;
    int num_attention_heads = 8;
    int max_position_embeddings = 77;
    std::string hidden_act = "quick_gelu";  // "gelu" (erf), "quick_gelu", "gelu_new"/"gelu_pytorch_tanh"
    double layer_norm_eps = 1e-5;
    int bos_token_id = 49406;
    int eos_token_id = 49407;
    int pad_token_id = 1;
    int projection_dim = 512;

    static CLIPTextConfig from_json_text(const std::string& json, const std::string& source);
    static CLIPTextConfig from_file(const std::string& path);
    void validate(const std::string& source = "CLIPTextConfig") const;
};

// diffusers WuerstchenPrior (prior/config.json), stage C.
struct PriorConfig {
    int c_in = 16;
    int c = 1280;
    int c_cond = 1024;
    int c_r = 64;
    int depth = 16;
    int nhead = 16;
    double dropout = 0.1;  // unused at inference; kept so the config round-trips

    static PriorConfig from_json_text(const std::string& json, const std::string& source);
    static PriorConfig from_file(const std::string& path);
    void validate(const std::string& source = "PriorConfig") const;
};

// diffusers WuerstchenDiffNeXt (decoder/config.json), stage B.
struct DiffNeXtConfig {
    int c_in = 4;
    int c_out = 4;
    int c_r = 64;
    int patch_size = 2;
    int c_cond = 1024;
    std::vector<int> c_hidden = {320, 640, 1280, 1280};
    std::vector<int> nhead = {-1, 10, 20, 20};
    std::vector<int> blocks = {4, 4, 14, 4};
    std::vector<std::string> level_config = {"CT", "CTA", "CTA", "CTA"};
    std::vector<bool> inject_effnet = {false, true, true, true};
    int effnet_embd = 16;
    int clip_embd = 1024;
    int kernel_size = 3;
    std::vector<double> dropout = {0.1, 0.1, 0.1, 0.1};  // a scalar in JSON is broadcast per level

    static DiffNeXtConfig from_json_text(const std::string& json, const std::string& source);
    static DiffNeXtConfig from_file(const std::string& path);
    void validate(const std::string& source = "DiffNeXtConfig") const;
};

// diffusers PaellaVQModel (vqgan/config.json), stage A.
struct PaellaVQConfig {
    int in_channels = 3;
    int out_channels = 3;
    int up_down_scale_factor = 2;
    int levels = 2;
    int bottleneck_blocks = 12;
    int embed_dim = 384;
    int latent_channels = 4;
    int num_vq_embeddings = 8192;
    double scale_factor = 0.3764;

    static PaellaVQConfig from_json_text(const std::string& json, const std::string& source);
    static PaellaVQConfig from_file(const std::string& path);
    void validate(const std::string& source = "PaellaVQConfig") const;
};

// diffusers DDPMWuerstchenScheduler (scheduler/scheduler_config.json).
struct SchedulerConfig {
    double scaler = 1.0;
    double s = 0.008;

    static SchedulerConfig from_json_text(const std::string& json, const std::string& source);
    static SchedulerConfig from_file(const std::string& path);
    void validate(const std::string& source = "SchedulerConfig") const;
};

// The pipeline-level values of model_index.json, with the defaults of the pipelines'
// constructors (prior: latent_mean, latent_std, resolution_multiple; decoder: latent_dim_scale).
struct ModelIndex {
    std::string class_name;  // "_class_name", e.g. "WuerstchenPriorPipeline"
    // component name -> {library, class}, e.g. "prior" -> {"diffusers", "WuerstchenPrior"}
    std::map<std::string, std::vector<std::string>> components;
    double latent_mean = 42.0;
    double latent_std = 1.0;
    double resolution_multiple = 42.67;
    double latent_dim_scale = 10.67;

    bool has_component(const std::string& name) const { return components.count(name) != 0; }

    static ModelIndex from_json_text(const std::string& json, const std::string& source);
    static ModelIndex from_file(const std::string& path);
    void validate(const std::string& source = "model_index.json") const;
};

// Reads a whole text file; throws IoError naming the path.
std::string read_text_file(const std::string& path);

}  // namespace wuerstchen
