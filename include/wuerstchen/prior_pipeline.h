#pragma once

// diffusers' WuerstchenPriorPipeline (stage C): text -> CLIP text states -> denoised image
// embeddings [B, 16, ceil(H / 42.67), ceil(W / 42.67)] for the decoder (stage B).
//
//   auto prior = wuerstchen::PriorPipeline::from_pretrained("wuerstchen-prior", {torch::kCUDA});
//   wuerstchen::PriorOptions opts;
//   opts.prompts = {"an image of a shiba inu, donning a spacesuit and helmet"};
//   opts.seed = 0;
//   torch::Tensor emb = prior(opts).image_embeddings;

#include <ATen/core/Generator.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/scheduler.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

// One call's arguments, with the defaults of diffusers' __call__.
struct PriorOptions {
    // The prompts (one image batch entry each), or precomputed text states instead.
    std::vector<std::string> prompts;
    // Used only with guidance (guidance_scale > 1). Empty: "" per prompt. Otherwise one per
    // prompt (as upstream, a single negative prompt with several prompts is an error).
    std::vector<std::string> negative_prompts;
    torch::Tensor prompt_embeds;           // [B, L, c_cond], instead of `prompts`
    torch::Tensor negative_prompt_embeds;  // [B, L, c_cond], instead of `negative_prompts`

    int height = 1024;  // pixels of the final image; latents are ceil(size / resolution_multiple)
    int width = 1024;
    int num_inference_steps = 60;
    // Custom schedule (e.g. kDefaultStageCTimesteps), strictly descending in [0, 1], at least
    // two points; overrides num_inference_steps when not empty.
    std::vector<double> timesteps;
    double guidance_scale = 8.0;  // classifier-free guidance when > 1
    int num_images_per_prompt = 1;

    // Noise source: a caller-owned CPU generator (it advances), or a seed, or neither
    // (nondeterministic). Setting both is an error.
    std::optional<uint64_t> seed;
    at::Generator* generator = nullptr;
    // Initial noise [B * num_images_per_prompt, c_in, latent_h, latent_w] instead of a draw.
    torch::Tensor latents;

    StepCallback callback;  // after each step; returning false throws Cancelled

    // Convenience for one prompt.
    PriorOptions& prompt(const std::string& text) {
        prompts = {text};
        return *this;
    }
};

// The pipelines' outputs are made in c10::InferenceMode, so they are inference tensors: read
// them freely, but clone() one before changing it in place outside InferenceMode.
struct PriorOutput {
    // latents * latent_mean - latent_std, [B * num_images_per_prompt, c_in, h, w].
    torch::Tensor image_embeddings;
};

// The pipeline-level values of model_index.json.
struct PriorPipelineConfig {
    double latent_mean = 42.0;
    double latent_std = 1.0;
    double resolution_multiple = 42.67;
};

class StepGraphs;
class StepNoise;
struct NoiseDraw;

class PriorPipeline {
public:
    // From already-loaded components. The execution device is options.device when
    // options.offload or options.sequential_offload is set (the modules stay where they are
    // between calls and move there while they run), else the prior's device. options.dtype is
    // not used: the modules keep theirs. Throws InvalidArgument when both offload modes are set.
    PriorPipeline(CLIPTokenizer tokenizer, CLIPTextModel text_encoder, WuerstchenPrior prior,
                  DDPMWuerstchenScheduler scheduler, PriorPipelineConfig config = {},
                  const LoadOptions& options = {});

    // A warp-ai/wuerstchen-prior style folder: model_index.json, prior/, text_encoder/,
    // tokenizer/, scheduler/.
    static PriorPipeline from_pretrained(const std::string& dir, const LoadOptions& options = {});
    // The components "<prefix>prior", "<prefix>text_encoder", "<prefix>tokenizer" and
    // "<prefix>scheduler" of `dir` (e.g. prefix "prior_" in a combined pipeline's folder), with the
    // pipeline values of dir/model_index.json (diffusers' defaults where absent).
    static PriorPipeline from_components(const std::string& dir, const std::string& prefix,
                                         const LoadOptions& options = {});

    // Without offloading, constructing a pipeline packs the prior's condition mappers and
    // attention projections (WuerstchenPriorImpl::pack_condition_mappers,
    // pack_attention_projections) unless they are packed already: it must not overlap calls of
    // another pipeline that shares the prior.

    // Runs the denoising loop. Throws InvalidArgument (naming the argument) for bad options and
    // Cancelled when the callback returns false, OutOfMemoryError when memory runs out; the
    // pipeline stays usable in every case. One call at a time per pipeline object (separate
    // objects may run concurrently on different threads; LoRA changes must not overlap calls).
    PriorOutput operator()(const PriorOptions& options);
    PriorOutput generate(const PriorOptions& options) { return (*this)(options); }

    // The prior text encoder's last_hidden_state for `prompts` (tokenized with padding to 77 and
    // truncation): [B, 77, c_cond] on the execution device in the encoder's dtype, what
    // PriorOptions::prompt_embeds / negative_prompt_embeds take. Offloads like a call.
    torch::Tensor encode_prompt(const std::vector<std::string>& prompts);

    // LoadOptions::cuda_graphs: the denoising-step graphs captured so far (one per latent shape,
    // batch and guidance scale; dropped when the weights or LoRA state change).
    size_t captured_graphs() const;
    // The text encoder's graphs captured so far (one per number of prompts encoded at once).
    size_t captured_text_graphs() const;
    // Drops every captured graph (the steps' and the text encoder's); the memory they held goes
    // back to libtorch's caching allocator. The next call captures again. Each latent shape, batch
    // and guidance scale keeps a graph until then, so a program that sweeps many of them can bound
    // the memory with this. Not during a call.
    void clear_graphs();

    // The latent size for an image size: ceil(size / resolution_multiple).
    int64_t latent_size(int64_t pixels) const;

    const CLIPTokenizer& tokenizer() const { return tokenizer_; }
    CLIPTextModel& text_encoder() { return text_encoder_; }
    WuerstchenPrior& prior() { return prior_; }
    const DDPMWuerstchenScheduler& scheduler() const { return scheduler_; }
    const PriorPipelineConfig& config() const { return config_; }
    torch::Device device() const { return device_; }

    // ---- LoRA, as diffusers' StableDiffusionLoraLoaderMixin (wuerstchen/lora.h has the rules)
    // Loads a LoRA file (or a folder holding pytorch_lora_weights.safetensors) into the prior
    // ("prior." / "lora_unet_" keys) and the text encoder ("text_encoder." / "lora_te_" keys)
    // as adapter `adapter_name` with weight `scale` (empty name: "default_<n>"). Throws
    // WeightError naming the file and key(s) when the file does not fit (nothing is applied
    // then), InvalidArgument when the name is taken, IoError when the file is missing.
    void load_lora_weights(const std::string& path, const std::string& adapter_name = "default",
                           double scale = 1.0);
    // Activates exactly these adapters with these weights (empty: 1.0 each; one value: for all).
    // Throws InvalidArgument naming an unknown adapter.
    void set_adapters(const std::vector<std::string>& adapter_names,
                      const std::vector<double>& weights = {});
    // The loaded adapters in load order (diffusers' get_list_adapters, merged over components).
    std::vector<std::string> lora_adapters() const;
    // Merges the active adapters (or `adapter_names`) into the weights, scaled by lora_scale
    // times their weight; unfuse_lora() restores the original weights bit-exactly. Unloading
    // while fused keeps the fused weights (diffusers' fuse + unload recipe).
    void fuse_lora(double lora_scale = 1.0, const std::vector<std::string>& adapter_names = {});
    void unfuse_lora();
    // Removes every adapter (weights as they are: unfuse_lora() first to get the base back).
    void unload_lora_weights();
    void delete_adapters(const std::vector<std::string>& adapter_names);
    void enable_lora();   // the unfused LoRA branches on (the default)
    void disable_lora();  // ... off, adapters kept
    // Writes adapter `adapter_name` (empty: the only one) with diffusers' peft keys to a
    // .safetensors path, or a folder that gets pytorch_lora_weights.safetensors.
    void save_lora_weights(const std::string& path, const std::string& adapter_name = "") const;

    // A moved-from pipeline can be assigned to and destroyed; its calls that need the models
    // throw InvalidArgument.
    PriorPipeline(PriorPipeline&&) noexcept = default;
    PriorPipeline& operator=(PriorPipeline&&) noexcept = default;

private:
    friend class CombinedPipeline;
    // A move takes the graph caches, which every constructor makes.
    bool moved_from() const { return graphs_ == nullptr; }
    // Throws InvalidArgument when moved_from().
    void check_usable() const;
    // draws: the call's random draws (latents unless given, then one per step) from a plan
    // shared with the decoder stage; null: the call makes its own.
    PriorOutput run(const PriorOptions& options, StepNoise* draws);
    // run() with out-of-memory errors turned into OutOfMemoryError (what operator() does).
    PriorOutput call(const PriorOptions& options, StepNoise* draws);
    // The draws of a call with latents of `latent_shape`: the latents (unless given), then one
    // per step, each in the dtype and on the device the call uses them in.
    std::vector<NoiseDraw> planned_draws(const std::vector<int64_t>& latent_shape,
                                         bool latents_given, int64_t steps) const;
    torch::Tensor encode(const std::vector<std::string>& prompts, torch::ScalarType dtype);
    std::vector<torch::nn::Module*> lora_modules() const;
    // Without offload: packs the text encoder's and the prior's projections and the prior's
    // condition mappers; with sequential offload: page-locks the weights. A no-op for what
    // already is.
    void lay_out_weights();

    CLIPTokenizer tokenizer_;
    CLIPTextModel text_encoder_;
    WuerstchenPrior prior_;
    DDPMWuerstchenScheduler scheduler_;
    PriorPipelineConfig config_;
    torch::Device device_;
    LoadOptions options_;                 // offload / sequential_offload / cuda_graphs
    std::shared_ptr<StepGraphs> graphs_;  // LoadOptions::cuda_graphs: one per pipeline
    std::shared_ptr<StepGraphs> text_graphs_;  // the text encoder's, likewise
};

}  // namespace wuerstchen
