#include "wuerstchen/combined_pipeline.h"

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "step_noise.h"
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

std::vector<NoiseDraw> CombinedPipeline::draw_plan(const CombinedOptions& options) {
    // Both stages draw from one generator, in this order: the prior's latents (unless given),
    // one draw per prior step, the decoder's latents, one draw per decoder step. None depends on
    // a model's output, so one worker draws them all ahead, the decoder's while the prior runs.
    // Shapes follow the stages' own (each checks its draws against its shapes). Options the
    // prior will reject give no plan or fail before the first draw; draws made ahead for a
    // decoder that then rejects its options are undone (StepNoise's destructor).
    if (options.prior_callback || options.callback) return {};  // could draw too
    const int64_t prompts = !options.prompts.empty() ? static_cast<int64_t>(options.prompts.size())
                            : options.prompt_embeds.defined() && options.prompt_embeds.dim() == 3
                                ? options.prompt_embeds.size(0)
                                : 0;
    const int64_t n = options.num_images_per_prompt;
    const int64_t prior_steps = options.prior_timesteps.empty()
                                    ? options.prior_num_inference_steps
                                    : static_cast<int64_t>(options.prior_timesteps.size()) - 1;
    const int64_t decoder_steps = options.decoder_timesteps.empty()
                                      ? options.num_inference_steps
                                      : static_cast<int64_t>(options.decoder_timesteps.size()) - 1;
    constexpr int64_t most = DDPMWuerstchenScheduler::kMaxSteps;
    if (prompts < 1 || n < 1 || prior_steps < 1 || decoder_steps < 1 || prior_steps > most ||
        decoder_steps > most || options.height < 1 || options.width < 1)
        return {};
    const int64_t h = prior_.latent_size(options.height);
    const int64_t w = prior_.latent_size(options.width);
    const std::vector<int64_t> prior_shape = {prompts * n, prior_.prior()->config().c_in, h, w};
    std::vector<NoiseDraw> plan =
        prior_.planned_draws(prior_shape, options.latents.defined(), prior_steps);
    const std::vector<NoiseDraw> decoder_draws = decoder_.planned_draws(
        decoder_.latent_shape(prompts * n, h, w), /*latents_given=*/false, decoder_steps);
    plan.insert(plan.end(), decoder_draws.begin(), decoder_draws.end());
    return plan;
}

CombinedOutput CombinedPipeline::operator()(const CombinedOptions& options) {
    if (prior_.moved_from() || decoder_.moved_from())
        throw InvalidArgument("CombinedPipeline: this pipeline was moved from");
    // One generator for both stages, so a seed reproduces upstream's draw sequence.
    at::Generator generator = call_generator(options.generator, options.seed);
    std::optional<StepNoise> draws;
    if (std::vector<NoiseDraw> plan = draw_plan(options); !plan.empty())
        draws.emplace(generator, std::move(plan), /*ahead=*/true);
    StepNoise* shared = draws ? &*draws : nullptr;

    PriorOptions prior = prior_options(options);
    prior.seed.reset();
    prior.generator = &generator;
    CombinedOutput out;
    out.image_embeddings = prior_.call(prior, shared).image_embeddings;

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
    decoder.negative_prompts = per_image(options.negative_prompts);
    // Given prior text states, the decoder sees "" (as upstream): once for all images, or once
    // per image when negative prompts come one per image.
    if (options.prompts.empty())
        decoder.prompts.assign(std::max<size_t>(decoder.negative_prompts.size(), 1), "");
    else
        decoder.prompts = per_image(options.prompts);
    decoder.num_inference_steps = options.num_inference_steps;
    decoder.timesteps = options.decoder_timesteps;
    decoder.guidance_scale = options.decoder_guidance_scale;
    decoder.generator = &generator;
    decoder.callback = options.callback;
    out.images = decoder_.call(decoder, shared).images;
    return out;
}

}  // namespace wuerstchen
