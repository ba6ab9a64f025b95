#include "wuerstchen/combined_pipeline.h"

#include "wuerstchen/error.h"

namespace wuerstchen {

CombinedPipeline::CombinedPipeline(PriorPipeline prior, DecoderPipeline decoder)
    : prior_(std::move(prior)), decoder_(std::move(decoder)) {}

CombinedPipeline CombinedPipeline::from_pretrained(const std::string& prior_dir,
                                                   const std::string& decoder_dir,
                                                   const LoadOptions& options) {
    return CombinedPipeline(PriorPipeline::from_pretrained(prior_dir, options),
                            DecoderPipeline::from_pretrained(decoder_dir, options));
}

CombinedPipeline CombinedPipeline::from_pretrained(const std::string& dir,
                                                   const LoadOptions& options) {
    return CombinedPipeline(PriorPipeline::from_components(dir, "prior_", options),
                            DecoderPipeline::from_pretrained(dir, options));
}

PriorOptions prior_options(const CombinedOptions& options) {
    PriorOptions prior;
    prior.prompts = options.prompts;
    prior.negative_prompts = options.negative_prompts;
    prior.prompt_embeds = options.prompt_embeds;
    prior.negative_prompt_embeds = options.negative_prompt_embeds;
    prior.height = options.height;
    prior.width = options.width;
    prior.num_inference_steps = options.prior_num_inference_steps;
    prior.timesteps = options.prior_timesteps;
    prior.guidance_scale = options.prior_guidance_scale;
    prior.num_images_per_prompt = options.num_images_per_prompt;
    prior.seed = options.seed;
    prior.generator = options.generator;
    prior.latents = options.latents;
    prior.callback = options.prior_callback;
    return prior;
}

CombinedOutput CombinedPipeline::operator()(const CombinedOptions& options) {
    // One generator for both stages, so a seed reproduces upstream's draw sequence.
    at::Generator generator = call_generator(options.generator, options.seed);

    PriorOptions prior = prior_options(options);
    prior.seed.reset();
    prior.generator = &generator;
    CombinedOutput out;
    out.image_embeddings = prior_(prior).image_embeddings;

    // The decoder gets one embedding per image. Upstream hands it the prompt list unchanged,
    // which only lines up for a single prompt; here prompt i goes with its n embeddings.
    const int n = options.num_images_per_prompt;
    auto per_image = [n](const std::vector<std::string>& prompts) {
        if (prompts.size() <= 1) return prompts;
        std::vector<std::string> out;
        out.reserve(prompts.size() * static_cast<size_t>(n));
        for (const auto& p : prompts) out.insert(out.end(), static_cast<size_t>(n), p);
        return out;
    };
    DecoderOptions decoder;
    decoder.image_embeddings = out.image_embeddings;
    decoder.prompts = options.prompts.empty() ? std::vector<std::string>{""} : per_image(options.prompts);
    decoder.negative_prompts = per_image(options.negative_prompts);
    decoder.num_inference_steps = options.num_inference_steps;
    decoder.timesteps = options.decoder_timesteps;
    decoder.guidance_scale = options.decoder_guidance_scale;
    decoder.generator = &generator;
    decoder.callback = options.callback;
    out.images = decoder_(decoder).images;
    return out;
}

}  // namespace wuerstchen
