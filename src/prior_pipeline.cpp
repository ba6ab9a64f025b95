#include "wuerstchen/prior_pipeline.h"

#include <c10/core/InferenceMode.h>

#include <cmath>
#include <optional>
#include <utility>

#include "nn/blocks.h"
#include "offload.h"
#include "step_graphs.h"
#include "step_noise.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"

namespace wuerstchen {

namespace {

constexpr const char* kWhere = "PriorPipeline";

[[noreturn]] void invalid(const std::string& what) {
    throw InvalidArgument(std::string(kWhere) + ": " + what);
}

}  // namespace

PriorPipeline::PriorPipeline(CLIPTokenizer tokenizer, CLIPTextModel text_encoder,
                             WuerstchenPrior prior, DDPMWuerstchenScheduler scheduler,
                             PriorPipelineConfig config, const LoadOptions& options)
    : tokenizer_(std::move(tokenizer)),
      text_encoder_(std::move(text_encoder)),
      prior_(std::move(prior)),
      scheduler_(std::move(scheduler)),
      config_(config),
      device_(options.offload || options.sequential_offload ? options.device
                                                             : module_device(*prior_)),
      options_(options),
      graphs_(std::make_shared<StepGraphs>()),
      text_graphs_(std::make_shared<StepGraphs>()) {
    if (!text_encoder_ || !prior_) invalid("`text_encoder` and `prior` must be loaded modules");
    check_dtype_on_device(kWhere, module_dtype(*prior_), device_);
    lay_out_weights();
    if (!(config_.resolution_multiple > 0) || !std::isfinite(config_.resolution_multiple))
        invalid("`resolution_multiple` must be a positive number");
    if (!std::isfinite(config_.latent_mean) || !std::isfinite(config_.latent_std))
        invalid("`latent_mean` and `latent_std` must be finite, got " +
                c10::str(config_.latent_mean) + " and " + c10::str(config_.latent_std));
    check_tokenizer_fits(kWhere, tokenizer_, *text_encoder_);
    if (text_encoder_->config().hidden_size != prior_->config().c_cond)
        invalid("the text encoder's hidden_size (" +
                std::to_string(text_encoder_->config().hidden_size) +
                ") differs from the prior's c_cond (" + std::to_string(prior_->config().c_cond) +
                ")");
}

PriorPipeline PriorPipeline::from_pretrained(const std::string& dir, const LoadOptions& options) {
    return from_components(dir, "", options);
}

PriorPipeline PriorPipeline::from_components(const std::string& dir, const std::string& prefix,
                                             const LoadOptions& options) {
    const std::string index_path = dir + "/model_index.json";
    const ModelIndex index = ModelIndex::from_file(index_path);
    for (const char* name : {"prior", "text_encoder", "tokenizer", "scheduler"})
        if (!index.components.empty() && !index.has_component(prefix + name))
            throw ConfigError(index_path + ": no component '" + prefix + name + "'");
    const OffloadMode mode = offload_mode(kWhere, options);
    check_dtype_on_device(kWhere, options.dtype, options.device);
    LoadOptions load = options;
    if (mode != OffloadMode::none) load.device = torch::kCPU;  // moved to options.device per call
    auto tokenizer = CLIPTokenizer::from_pretrained(dir + "/" + prefix + "tokenizer");
    auto text_encoder = load_clip_text_model(dir + "/" + prefix + "text_encoder", load);
    auto prior = load_prior(dir + "/" + prefix + "prior", load);
    DDPMWuerstchenScheduler scheduler(
        SchedulerConfig::from_file(dir + "/" + prefix + "scheduler/scheduler_config.json"));
    PriorPipelineConfig config{index.latent_mean, index.latent_std, index.resolution_multiple};
    return PriorPipeline(std::move(tokenizer), std::move(text_encoder), std::move(prior),
                         std::move(scheduler), config, options);
}

void PriorPipeline::lay_out_weights() {
    const OffloadMode mode = offload_mode(kWhere, options_);
    if (mode == OffloadMode::sequential) {
        pin_module(*text_encoder_);  // page-locked, for asynchronous block copies
        pin_module(*prior_);
    } else if (mode == OffloadMode::none) {
        // The models stay put: map all blocks' conditions at once, project q, k, v together.
        text_encoder_->pack_attention_projections();
        prior_->pack_condition_mappers();
        prior_->pack_attention_projections();
    }
}

// ---------------------------------------------------------------------------------- LoRA
// The modules are shared by the holders, so the const accessors below may hand out pointers.

void PriorPipeline::check_usable() const {
    if (moved_from()) invalid("this pipeline was moved from");
}

std::vector<torch::nn::Module*> PriorPipeline::lora_modules() const {
    check_usable();
    return {prior_.ptr().get(), text_encoder_.ptr().get()};
}

void PriorPipeline::load_lora_weights(const std::string& path, const std::string& adapter_name,
                                      double scale) {
    check_usable();
    load_lora_adapter(path, prior_pipeline_lora_targets(*prior_, *text_encoder_), adapter_name,
                      scale);
}

void PriorPipeline::set_adapters(const std::vector<std::string>& adapter_names,
                                 const std::vector<double>& weights) {
    set_lora_adapters(lora_modules(), adapter_names, weights);
}

std::vector<std::string> PriorPipeline::lora_adapters() const {
    return lora_adapter_names(lora_modules());
}

// Fusing gives the layers it merges into new weight tensors (unpacked, and pageable), and
// unfusing puts back the old ones, which may no longer sit with their group's others: lay the
// weights out again after either (groups fused in part stay unpacked until unfuse or unload:
// see nn::LinearGroup::pack), and after unloading, which drops the originals of fused weights.
void PriorPipeline::fuse_lora(double lora_scale, const std::vector<std::string>& adapter_names) {
    wuerstchen::fuse_lora(lora_modules(), lora_scale, adapter_names);
    lay_out_weights();
}

void PriorPipeline::unfuse_lora() {
    wuerstchen::unfuse_lora(lora_modules());
    lay_out_weights();
}

void PriorPipeline::unload_lora_weights() {
    unload_lora(lora_modules());
    lay_out_weights();
}

void PriorPipeline::delete_adapters(const std::vector<std::string>& adapter_names) {
    delete_lora_adapters(lora_modules(), adapter_names);
}

void PriorPipeline::enable_lora() { set_lora_enabled(lora_modules(), true); }

void PriorPipeline::disable_lora() { set_lora_enabled(lora_modules(), false); }

void PriorPipeline::save_lora_weights(const std::string& path,
                                      const std::string& adapter_name) const {
    const auto modules = lora_modules();
    save_lora_adapter(path, prior_pipeline_lora_targets(*modules[0], *modules[1]), adapter_name);
}

int64_t PriorPipeline::latent_size(int64_t pixels) const {
    // ceil(height / self.config.resolution_multiple), in double as Python does.
    const double size = std::ceil(static_cast<double>(pixels) / config_.resolution_multiple);
    if (!(std::abs(size) < 0x1p62))  // an int64 holds it (and a product of a few such sizes fails
                                     // the allocation checks instead of the conversion)
        invalid(std::to_string(pixels) + " pixels at resolution_multiple " +
                c10::str(config_.resolution_multiple) + " give a latent size beyond 2^62");
    return static_cast<int64_t>(size);
}

torch::Tensor PriorPipeline::encode(const std::vector<std::string>& prompts,
                                    torch::ScalarType dtype) {
    return encode_prompts_graphed(tokenizer_, text_encoder_, prompts, device_, dtype,
                                  text_graphs_.get(), options_, offload_mode(kWhere, options_));
}

size_t PriorPipeline::captured_graphs() const {
    check_usable();
    return graphs_->size();
}

size_t PriorPipeline::captured_text_graphs() const {
    check_usable();
    return text_graphs_->size();
}

void PriorPipeline::clear_graphs() {
    check_usable();
    graphs_->clear();
    text_graphs_->clear();
}

torch::Tensor PriorPipeline::encode_prompt(const std::vector<std::string>& prompts) {
    check_usable();
    return with_memory_errors(kWhere, [&] {
        if (prompts.empty()) invalid("`prompts` is empty");
        const auto on_device = stage_scope(text_encoder_, device_, offload_mode(kWhere, options_));
        c10::InferenceMode inference;
        return encode(prompts, module_dtype(*text_encoder_));
    });
}

PriorOutput PriorPipeline::operator()(const PriorOptions& options) {
    return call(options, nullptr);
}

PriorOutput PriorPipeline::call(const PriorOptions& options, StepNoise* draws) {
    check_usable();
    return with_memory_errors(kWhere, [&] { return run(options, draws); });
}

std::vector<NoiseDraw> PriorPipeline::planned_draws(const std::vector<int64_t>& latent_shape,
                                                    bool latents_given, int64_t steps) const {
    check_usable();
    // The latents in the text states' dtype (as run() makes them), the steps' noise in the
    // prior's output dtype (the scheduler's model_output).
    std::vector<NoiseDraw> plan;
    if (!latents_given) plan.push_back({latent_shape, module_dtype(*text_encoder_), device_});
    plan.insert(plan.end(), static_cast<size_t>(steps),
                {latent_shape, module_dtype(*prior_), device_});
    return plan;
}

PriorOutput PriorPipeline::run(const PriorOptions& o, StepNoise* shared_draws) {
    // ---- validation: everything before any work or draw
    check_positive(kWhere, "height", o.height);
    check_positive(kWhere, "width", o.width);
    check_positive(kWhere, "num_images_per_prompt", o.num_images_per_prompt);
    check_guidance_scale(kWhere, "guidance_scale", o.guidance_scale, module_dtype(*prior_));
    if (o.timesteps.empty())
        check_positive(kWhere, "num_inference_steps", o.num_inference_steps);
    else
        check_timesteps(kWhere, "timesteps", o.timesteps);

    const bool has_prompts = !o.prompts.empty();
    const bool has_embeds = o.prompt_embeds.defined();
    if (has_prompts && has_embeds)
        invalid("`prompts` and `prompt_embeds` are both set: pass one of them");
    if (!has_prompts && !has_embeds)
        invalid("`prompts` is empty and `prompt_embeds` is not set: pass one of them");
    const int64_t c_cond = prior_->config().c_cond;
    // Text states: a floating [rows, L, c_cond] with L >= 1; any rows >= 1 when rows < 0.
    auto check_states = [&](const char* name, const torch::Tensor& t, int64_t rows) {
        if (t.dim() == 3 && t.size(0) >= 1 && (rows < 0 || t.size(0) == rows) && t.size(1) >= 1 &&
            t.size(2) == c_cond && t.is_floating_point())
            return;
        invalid(std::string("`") + name + "` must be a floating tensor [" +
                (rows < 0 ? "B" : std::to_string(rows)) + ", L, " + std::to_string(c_cond) +
                "] with " + (rows < 0 ? "B, L" : "L") + " >= 1, got " + shape_string(t.sizes()) +
                " " + c10::toString(t.scalar_type()));
    };
    if (has_embeds) check_states("prompt_embeds", o.prompt_embeds, -1);
    const int64_t batch =
        has_prompts ? static_cast<int64_t>(o.prompts.size()) : o.prompt_embeds.size(0);
    const bool cfg = o.guidance_scale > 1.0;  // do_classifier_free_guidance
    if (!o.negative_prompts.empty() && o.negative_prompt_embeds.defined())
        invalid("`negative_prompts` and `negative_prompt_embeds` are both set: pass one of them");
    if (cfg && !o.negative_prompts.empty() &&
        static_cast<int64_t>(o.negative_prompts.size()) != batch)
        invalid("`negative_prompts` has " + std::to_string(o.negative_prompts.size()) +
                " entries but there are " + std::to_string(batch) +
                " prompts: pass one negative prompt per prompt");
    if (o.negative_prompt_embeds.defined()) {
        if (has_embeds && o.negative_prompt_embeds.sizes() != o.prompt_embeds.sizes())
            invalid("`negative_prompt_embeds` has shape " +
                    shape_string(o.negative_prompt_embeds.sizes()) +
                    " but `prompt_embeds` has shape " + shape_string(o.prompt_embeds.sizes()));
        check_states("negative_prompt_embeds", o.negative_prompt_embeds, batch);
    }
    // Both halves of a guided batch go through one forward: the same token count. Text is
    // encoded to the tokenizer's model_max_length.
    if (cfg) {
        const int64_t encoded_len = tokenizer_.model_max_length();
        const int64_t prompt_len = has_embeds ? o.prompt_embeds.size(1) : encoded_len;
        const int64_t negative_len =
            o.negative_prompt_embeds.defined() ? o.negative_prompt_embeds.size(1) : encoded_len;
        if (prompt_len != negative_len)
            invalid(std::string(has_embeds ? "`prompt_embeds`" : "the prompts") + " give " +
                    std::to_string(prompt_len) + " tokens but " +
                    (o.negative_prompt_embeds.defined() ? "`negative_prompt_embeds`"
                                                        : "the negative prompts") +
                    " give " + std::to_string(negative_len) +
                    ": with guidance both halves need the same length (text is encoded to " +
                    std::to_string(encoded_len) + " tokens)");
    }
    const int64_t n = o.num_images_per_prompt;
    const std::vector<int64_t> latent_shape = {batch * n, prior_->config().c_in,
                                               latent_size(o.height), latent_size(o.width)};
    check_allocatable(kWhere, "`height`, `width` and `num_images_per_prompt`", latent_shape,
                      torch::kFloat32);
    if (o.latents.defined()) check_shape(kWhere, "latents", o.latents, latent_shape);

    at::Generator generator = call_generator(o.generator, o.seed);
    DDPMWuerstchenScheduler scheduler = scheduler_;  // per call: the pipeline stays reentrant
    if (o.timesteps.empty())
        scheduler.set_timesteps(o.num_inference_steps);
    else
        scheduler.set_timesteps(o.timesteps);

    const OffloadMode mode = offload_mode(kWhere, options_);
    c10::InferenceMode inference;
    const torch::ScalarType dtype = module_dtype(*text_encoder_);

    // ---- encode_prompt
    torch::Tensor text_states;
    {
        // Offload moves the text encoder only when some text is left to encode.
        const bool encodes_text = !has_embeds || (cfg && !o.negative_prompt_embeds.defined());
        const auto on_device =
            stage_scope(text_encoder_, device_, encodes_text ? mode : OffloadMode::none);
        const bool encodes_negative = cfg && !o.negative_prompt_embeds.defined();
        std::vector<std::string> negative_prompts = o.negative_prompts;
        if (encodes_negative && negative_prompts.empty())
            negative_prompts.assign(static_cast<size_t>(batch), "");
        // Prompts and negative prompts in one batch when both are text: each row is encoded
        // on its own (upstream encodes them in two calls), and the text encoder's weights are
        // read once instead of twice.
        torch::Tensor prompt_embeds, both;
        if (has_embeds) {
            prompt_embeds = o.prompt_embeds.to(device_, dtype);
        } else if (encodes_negative) {
            std::vector<std::string> texts = o.prompts;
            texts.insert(texts.end(), negative_prompts.begin(), negative_prompts.end());
            both = encode(texts, dtype);
            prompt_embeds = both.narrow(0, 0, batch);
        } else {
            prompt_embeds = encode(o.prompts, dtype);
        }
        prompt_embeds = prompt_embeds.repeat_interleave(n, 0);
        text_states = prompt_embeds;
        if (cfg) {
            torch::Tensor negative;
            if (o.negative_prompt_embeds.defined())
                negative = o.negative_prompt_embeds.to(device_, dtype);
            else if (both.defined())
                negative = both.narrow(0, batch, batch);
            else
                negative = encode(negative_prompts, dtype);
            // Upstream repeats the negative states as a block (repeat, then view), the prompt
            // states per prompt (repeat_interleave).
            const int64_t seq_len = negative.size(1);
            negative = negative.repeat({1, n, 1}).view({batch * n, seq_len, -1});
            // One batched forward: [text ; uncond].
            text_states = torch::cat({prompt_embeds, negative});
        }
    }

    // ---- the call's draws: the latents (unless given), then one per step in the scheduler, made
    // ahead on a worker while the device computes unless a step callback (which could draw from
    // the generator itself) runs between the steps.
    std::optional<StepNoise> own_draws;
    if (shared_draws == nullptr)
        own_draws.emplace(generator,
                          planned_draws(latent_shape, o.latents.defined(), scheduler.num_steps()),
                          /*ahead=*/!o.callback);
    StepNoise& draws = shared_draws != nullptr ? *shared_draws : *own_draws;

    // ---- prepare_latents
    torch::Tensor latents =
        o.latents.defined() ? contiguous_on(o.latents, device_, dtype) : draws.next(latent_shape);
    latents = latents * DDPMWuerstchenScheduler::kInitNoiseSigma;

    const auto on_device = stage_scope(prior_, device_, mode);
    // The text condition as the blocks read it, mapped once for all steps (graph inputs copied
    // once per call).
    const PriorCondition mapped_condition =
        prior_->map_condition(text_states, /*project_kv=*/projects_text_kv(options_, device_));
    const std::vector<torch::Tensor> condition = mapped_condition.tensors();
    const double guidance = o.guidance_scale;
    auto graph_key = graphs_->prepare_call(options_, mode, device_, *prior_, cfg, guidance);
    // Every step's timestep and schedule factors at once, on the device, and, when the timestep
    // mappers are packed, every step's modulations of the blocks in one product (a step then
    // reads its row instead of embedding and mapping its ratio).
    const SchedulerStepPlan plan = scheduler.plan_steps(dtype, device_);
    const MappedTimesteps modulations = prior_->map_timesteps(plan.timesteps);
    if (graph_key && modulations.residual_biases_folded) *graph_key += "|residual biases folded";
    // One denoising step: the prior on the latents for both halves of the guidance condition
    // (one batched forward that runs its first blocks once for both), mixed as lerp(uncond,
    // text, guidance_scale). in[1] is the step's row of `modulations` (for every sample), else
    // its ratio per sample.
    const StepGraphs::Step denoise = [&](const std::vector<torch::Tensor>& in) {
        const auto x = in_memory_format(in[0], options_);
        const auto mapped = mapped_condition.with_tensors({in.begin() + 2, in.end()});
        const auto out = modulations.defined()
                             ? prior_->forward(x, modulations.with_rows(in[1]), mapped)
                             : prior_->forward(x, in[1], mapped);
        if (!cfg) return out;
        auto chunks = out.chunk(2);
        return torch::lerp(chunks[1], chunks[0], guidance);
    };
    const CallbackWeightsWatch watch(*prior_, o.callback && mode == OffloadMode::none, [&] {
        prior_->check_condition(mapped_condition);
        if (modulations.defined())
            nn::check_mapped_timesteps(modulations.row(0), prior_->offload_units(), 1,
                                       modulations.rows.device(), modulations.rows.scalar_type(),
                                       "WuerstchenPrior");
    });
    for (int i = 0; i < plan.steps(); ++i) {
        const float t = plan.points[static_cast<size_t>(i)];
        // The step's row of modulations, else ratio = t.expand(latents.size(0)).to(dtype).
        std::vector<torch::Tensor> inputs = {latents, modulations.defined()
                                                          ? modulations.row(i).rows
                                                          : plan.timestep(i, latents.size(0))};
        inputs.insert(inputs.end(), condition.begin(), condition.end());
        torch::Tensor pred = graph_key ? graphs_->run(inputs, *graph_key, denoise, condition.size())
                                       : denoise(inputs);
        latents = scheduler.step(pred, plan, i, latents, draws.next(latent_shape));

        if (o.callback) {
            const bool keep_going = o.callback(i, static_cast<double>(t), latents);
            if (!latents.defined() || latents.sizes() != c10::IntArrayRef(latent_shape))
                invalid("the step callback replaced `latents` by a tensor of shape " +
                        (latents.defined() ? shape_string(latents.sizes()) : "undefined") +
                        ", expected " + shape_string(latent_shape));
            latents = contiguous_on(latents, device_, dtype, /*copy=*/true);
            if (!keep_going)
                throw Cancelled(std::string(kWhere) +
                                ": cancelled by the step callback after step " + std::to_string(i));
            if (i + 1 < plan.steps()) watch.check(kWhere, "prior", i);
        }
    }

    // Upstream: `latents = latents * self.config.latent_mean - self.config.latent_std`
    // (not latents * std + mean; the reference outputs follow this formula).
    PriorOutput out;
    out.image_embeddings = latents * config_.latent_mean - config_.latent_std;
    return out;
}

}  // namespace wuerstchen
