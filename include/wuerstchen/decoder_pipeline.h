#pragma once

// diffusers' WuerstchenDecoderPipeline: image embeddings (from the prior, stage C) + prompt ->
// stage B (WuerstchenDiffNeXt) denoising loop -> stage A (PaellaVQModel) decode -> images.
//
//   auto pipe = wuerstchen::DecoderPipeline::from_pretrained("warp-ai/wuerstchen", {torch::kCUDA});
//   wuerstchen::DecoderOptions opt;
//   opt.image_embeddings = prior_output.image_embeddings;  // [B, 16, h, w]
//   opt.prompts = {"an image of a shiba inu"};
//   opt.seed = 42;
//   torch::Tensor images = pipe(opt).images;                 // [B, 3, H, W] float in [0, 1]
//
// Differences from upstream, on purpose:
// - num_images_per_prompt > 1 repeats the image embeddings as well as the text (upstream repeats
//   only the text and then fails on the batch mismatch).
// - a batch of prompts may hold one prompt per image embedding (prompt i goes with embedding i);
//   upstream only works with a single prompt, which is then used for every embedding.

#include <ATen/core/Generator.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/config.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/paella_vq.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

// The call's arguments, with diffusers' defaults.
struct DecoderOptions {
    // Image embeddings [B, effnet_embd, h, w] (effnet_embd = 16 for Würstchen); or, when this is
    // undefined, image_embeddings_list concatenated along the batch dimension.
    torch::Tensor image_embeddings;
    std::vector<torch::Tensor> image_embeddings_list;
    // One prompt (used for every embedding, as upstream) or one per embedding.
    std::vector<std::string> prompts = {""};
    // Used only when guidance_scale > 1: none ("" for each prompt), one, or one per prompt.
    std::vector<std::string> negative_prompts;
    // Not upstream (its decoder pipeline always encodes): text states of the decoder's text
    // encoder [P, L, D] (what encode_prompt returns) instead of `prompts`, which then stays at
    // its default or empty; P is 1 or one per embedding, as for `prompts`.
    torch::Tensor prompt_embeds;
    // With guidance, instead of `negative_prompts`: [1 or P, L, D]. Neither given: "" is encoded.
    torch::Tensor negative_prompt_embeds;
    int num_inference_steps = 12;
    // Custom descending points in [0, 1] (the last ends the chain); overrides num_inference_steps.
    std::vector<double> timesteps;
    // Classifier-free guidance is on when > 1: the unconditional half sees the negative prompt and
    // ZERO image embeddings; prediction = lerp(uncond, text, guidance_scale).
    double guidance_scale = 0.0;
    // Images per embedding. Rows are embedding-major: emb0 img0, emb0 img1, emb1 img0, ...
    // The initial latents [B * n, c_in, H, W] are drawn in one randn call, in that row order.
    int num_images_per_prompt = 1;
    // Randomness: `generator` (a CPU generator, shared and advanced) or a fresh one from `seed`
    // (torch.Generator().manual_seed(seed)); neither: nondeterministic. Draw order as diffusers:
    // the latents first (unless given), then one draw of the latents' shape per step.
    std::optional<uint64_t> seed;
    at::Generator* generator = nullptr;
    // Initial latents [B * n, c_in, H, W] instead of drawing them (H = int(h * latent_dim_scale)).
    torch::Tensor latents;
    // After every step; returning false throws Cancelled (the pipeline stays usable).
    StepCallback callback;
    // false: skip the VQGAN and return only the final latents (output_type="latent").
    bool decode = true;
};

// Inference tensors, as PriorOutput's: clone() before changing one in place.
struct DecoderOutput {
    torch::Tensor
        images;  // [B * n, 3, H', W'] float32 on the CPU, in [0, 1] (undefined if !decode)
    torch::Tensor latents;  // the final stage-B latents [B * n, c_in, H, W] on the compute device
};

// Already-loaded parts, e.g. shared with a combined pipeline.
struct DecoderComponents {
    CLIPTokenizer tokenizer;
    CLIPTextModel text_encoder{nullptr};
    WuerstchenDiffNeXt decoder{nullptr};
    PaellaVQModel vqgan{nullptr};
    SchedulerConfig scheduler;
    double latent_dim_scale = 10.67;  // model_index.json of the decoder pipeline
};

class StepGraphs;
class StepNoise;
struct NoiseDraw;

class DecoderPipeline {
public:
    // A warp-ai/wuerstchen-style folder: decoder/, vqgan/, text_encoder/, tokenizer/, scheduler/
    // and model_index.json (latent_dim_scale; optional). The combined pipeline's folder uses the
    // same names for its decoder parts, so it loads with this too (its model_index.json has no
    // latent_dim_scale: upstream's default 10.67 applies, as in WuerstchenCombinedPipeline).
    static DecoderPipeline from_pretrained(const std::string& dir, const LoadOptions& options = {});
    // From parts already loaded with `options` (device / dtype / offload tell where to run).
    static DecoderPipeline from_components(DecoderComponents components,
                                           const LoadOptions& options = {});

    // Without offloading, constructing a pipeline packs the decoder's condition mappers and
    // attention projections (WuerstchenDiffNeXtImpl::pack_condition_mappers,
    // pack_attention_projections) unless they are packed already: it must not overlap calls of
    // another pipeline that shares the decoder.

    // Runs the pipeline under c10::InferenceMode. Throws InvalidArgument naming the argument for
    // bad input, Cancelled when the callback returns false, OutOfMemoryError when memory runs
    // out; the pipeline stays usable in every case. One call at a time per pipeline object
    // (separate objects may run concurrently on different threads).
    DecoderOutput operator()(const DecoderOptions& options);

    // The decoder text encoder's last_hidden_state for `prompts` (padded to 77 tokens,
    // truncated): [P, 77, D] on the execution device in the decoder's dtype, what
    // DecoderOptions::prompt_embeds / negative_prompt_embeds take. Offloads like a call.
    torch::Tensor encode_prompt(const std::vector<std::string>& prompts);

    // Stage A alone: the VQGAN's decode(latents * scale_factor).clamp(0, 1) for stage-B latents
    // [B, c_in, H, W] -> images [B, 3, H', W'] float32 on the CPU. Offloads like a call.
    torch::Tensor decode_latents(const torch::Tensor& latents);

    // LoadOptions::cuda_graphs: the denoising-step graphs captured so far (one per latent shape,
    // batch and guidance scale; dropped when the weights change).
    size_t captured_graphs() const;
    // The text encoder's graphs captured so far (one per number of distinct prompts encoded at
    // once).
    size_t captured_text_graphs() const;
    // Drops every captured graph (the steps' and the text encoder's); the memory they held goes
    // back to libtorch's caching allocator. The next call captures again. Each latent shape, batch
    // and guidance scale keeps a graph until then, so a program that sweeps many of them can bound
    // the memory with this. Not during a call.
    void clear_graphs();

    // The latent shape for image embeddings of spatial size h x w:
    // [batch, c_in, int(h * latent_dim_scale), int(w * latent_dim_scale)] (Python int():
    // truncation).
    std::vector<int64_t> latent_shape(int64_t batch, int64_t h, int64_t w) const;

    const CLIPTokenizer& tokenizer() const { return tokenizer_; }
    CLIPTextModel& text_encoder() { return text_encoder_; }
    WuerstchenDiffNeXt& decoder() { return decoder_; }
    PaellaVQModel& vqgan() { return vqgan_; }
    const SchedulerConfig& scheduler_config() const { return scheduler_; }
    double latent_dim_scale() const { return latent_dim_scale_; }
    const LoadOptions& load_options() const { return options_; }

    // A moved-from pipeline can be assigned to and destroyed; its calls that need the models
    // throw InvalidArgument.

private:
    friend class CombinedPipeline;
    // A move takes the graph caches, which every constructor makes.
    bool moved_from() const { return graphs_ == nullptr; }
    // Throws InvalidArgument when moved_from().
    void check_usable() const;
    // draws: the call's random draws (latents unless given, then one per step) from a plan
    // shared with the prior stage; null: the call makes its own.
    DecoderOutput run(const DecoderOptions& options, StepNoise* draws);
    // run() with out-of-memory errors turned into OutOfMemoryError (what operator() does).
    DecoderOutput call(const DecoderOptions& options, StepNoise* draws);
    // The draws of a call with latents of `latent_shape`: the latents (unless given), then one
    // per step, each in the dtype and on the device the call uses them in.
    std::vector<NoiseDraw> planned_draws(const std::vector<int64_t>& latent_shape,
                                         bool latents_given, int64_t steps) const;
    torch::Tensor decode_latents_impl(const torch::Tensor& latents);
    explicit DecoderPipeline(DecoderComponents components, const LoadOptions& options);

    CLIPTokenizer tokenizer_;
    CLIPTextModel text_encoder_{nullptr};
    WuerstchenDiffNeXt decoder_{nullptr};
    PaellaVQModel vqgan_{nullptr};
    SchedulerConfig scheduler_;
    double latent_dim_scale_ = 10.67;
    LoadOptions options_;
    std::shared_ptr<StepGraphs> graphs_;       // LoadOptions::cuda_graphs: one per pipeline
    std::shared_ptr<StepGraphs> text_graphs_;  // the text encoder's, likewise
};

}  // namespace wuerstchen
