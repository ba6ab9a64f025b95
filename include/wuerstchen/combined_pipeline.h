#pragma once

// diffusers' WuerstchenCombinedPipeline: text -> stage C (PriorPipeline) -> stages B and A
// (DecoderPipeline) -> images, with one generator flowing through both stages in upstream's draw
// order (prior latents, one draw per prior step, decoder latents, one draw per decoder step).
//
//   auto pipe = wuerstchen::CombinedPipeline::from_pretrained("wuerstchen-prior", "wuerstchen",
//                                                             {torch::kCUDA, torch::kFloat16});
//   wuerstchen::CombinedOptions opts;
//   opts.prompts = {"Anthropomorphic cat dressed as a fire fighter"};
//   opts.prior_timesteps = wuerstchen::kDefaultStageCTimesteps;
//   opts.seed = 42;
//   torch::Tensor images = pipe(opts).images;  // [1, 3, 512, 512] float in [0, 1]

#include <ATen/core/Generator.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/prior_pipeline.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

// One call's arguments, with the defaults of diffusers' combined __call__.
struct CombinedOptions {
    std::vector<std::string> prompts;
    // Used by each stage that runs with guidance (> 1): "" per prompt when empty, else one per
    // prompt.
    std::vector<std::string> negative_prompts;
    // Precomputed prior text states instead of `prompts` (the decoder then sees "" as upstream).
    torch::Tensor prompt_embeds;
    torch::Tensor negative_prompt_embeds;

    int height = 512;
    int width = 512;
    int prior_num_inference_steps = 60;
    std::vector<double> prior_timesteps;  // e.g. kDefaultStageCTimesteps; overrides the steps
    double prior_guidance_scale = 4.0;
    int num_inference_steps = 12;  // decoder steps
    std::vector<double> decoder_timesteps;
    double decoder_guidance_scale = 0.0;
    int num_images_per_prompt = 1;

    std::optional<uint64_t> seed;
    at::Generator* generator = nullptr;  // caller-owned CPU generator (advances)
    torch::Tensor latents;               // initial prior latents

    StepCallback prior_callback;  // after each stage-C step
    StepCallback callback;        // after each stage-B step
};

// Inference tensors, as PriorOutput's: clone() before changing one in place.
struct CombinedOutput {
    torch::Tensor images;            // [B * n, 3, H, W] float32 on the CPU, in [0, 1]
    torch::Tensor image_embeddings;  // the prior's output, [B * n, 16, h, w]
};

// The stage-C part of a combined call: prompts, size, prior schedule and guidance, images per
// prompt, seed / generator, latents and prior_callback, as PriorOptions.
PriorOptions prior_options(const CombinedOptions& options);

class CombinedPipeline {
public:
    CombinedPipeline(PriorPipeline prior, DecoderPipeline decoder);

    // Two folders, as the model card's two-pipeline usage: a warp-ai/wuerstchen-prior style
    // folder and a warp-ai/wuerstchen style folder.
    static CombinedPipeline from_pretrained(const std::string& prior_dir,
                                            const std::string& decoder_dir,
                                            const LoadOptions& options = {});
    // One folder saved by diffusers' combined pipeline: prior_prior/, prior_text_encoder/,
    // prior_tokenizer/, prior_scheduler/ plus decoder/, vqgan/, text_encoder/, tokenizer/,
    // scheduler/.
    static CombinedPipeline from_pretrained(const std::string& dir, const LoadOptions& options = {});

    // Throws InvalidArgument naming the argument for bad options, Cancelled when a callback
    // returns false. The pipeline stays usable either way.
    CombinedOutput operator()(const CombinedOptions& options);

    PriorPipeline& prior_pipeline() { return prior_; }
    DecoderPipeline& decoder_pipeline() { return decoder_; }
    // Both stages' clear_graphs().
    void clear_graphs() {
        prior_.clear_graphs();
        decoder_.clear_graphs();
    }

private:
    // Both stages' random draws for `options`, in diffusers' order on the one generator, to be
    // made ahead; empty when a step callback is set (it could draw too) or the options cannot
    // run (the stage then throws before any draw).
    std::vector<NoiseDraw> draw_plan(const CombinedOptions& options);

    PriorPipeline prior_;
    DecoderPipeline decoder_;
};

}  // namespace wuerstchen
