#include "wuerstchen/decoder_pipeline.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <sys/stat.h>

#include <cmath>
#include <optional>
#include <unordered_map>
#include <utility>

#include "nn/blocks.h"
#include "offload.h"
#include "step_graphs.h"
#include "step_noise.h"
#include "wuerstchen/error.h"
#include "wuerstchen/scheduler.h"

namespace wuerstchen {

namespace {

constexpr const char* kWhere = "DecoderPipeline";

[[noreturn]] void invalid(const std::string& name, const std::string& what) {
    throw InvalidArgument(std::string(kWhere) + ": `" + name + "` " + what);
}

bool path_exists(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

// Rows of a [P, ...] tensor for `rows` outputs in embedding-major order with `per_embedding`
// rows per embedding: one prompt serves all rows, else prompt i serves embedding i.
torch::Tensor expand_rows(const torch::Tensor& per_prompt, int64_t rows, int64_t per_embedding) {
    const int64_t p = per_prompt.size(0);
    auto index = at::arange(rows, torch::TensorOptions().dtype(torch::kLong));
    index = p == 1 ? at::zeros_like(index) : at::div(index, per_embedding, "floor");
    return per_prompt.index_select(0, index.to(per_prompt.device()));
}

// encode_prompts with each distinct prompt encoded once (the combined pipeline hands the
// decoder one prompt per image, so num_images_per_prompt copies of each): one row per prompt.
// The text encoder's forward replays from `graphs` where options and mode allow.
torch::Tensor encode_distinct(const CLIPTokenizer& tokenizer, CLIPTextModel& text_encoder,
                              const std::vector<std::string>& prompts, torch::Device device,
                              torch::ScalarType dtype, StepGraphs& graphs,
                              const LoadOptions& options, OffloadMode mode) {
    std::vector<std::string> distinct;
    std::vector<int64_t> row;
    std::unordered_map<std::string, int64_t> seen;
    for (const auto& p : prompts) {
        const auto it = seen.emplace(p, static_cast<int64_t>(distinct.size())).first;
        if (it->second == static_cast<int64_t>(distinct.size())) distinct.push_back(p);
        row.push_back(it->second);
    }
    const auto states = encode_prompts_graphed(tokenizer, text_encoder, distinct, device, dtype,
                                               &graphs, options, mode);
    if (distinct.size() == prompts.size()) return states;
    return states.index_select(0,
                               to_device_queued(torch::tensor(row, torch::kLong), states.device()));
}

}  // namespace

DecoderPipeline::DecoderPipeline(DecoderComponents c, const LoadOptions& options)
    : tokenizer_(std::move(c.tokenizer)),
      text_encoder_(std::move(c.text_encoder)),
      decoder_(std::move(c.decoder)),
      vqgan_(std::move(c.vqgan)),
      scheduler_(c.scheduler),
      latent_dim_scale_(c.latent_dim_scale),
      options_(options),
      graphs_(std::make_shared<StepGraphs>()),
      text_graphs_(std::make_shared<StepGraphs>()) {
    if (!text_encoder_ || !decoder_ || !vqgan_)
        throw InvalidArgument(
            "DecoderPipeline: the text encoder, decoder and vqgan components must all be set");
    check_dtype_on_device(kWhere, module_dtype(*decoder_), options_.device);
    check_tokenizer_fits(kWhere, tokenizer_, *text_encoder_);
    if (text_encoder_->config().hidden_size != decoder_->config().clip_embd)
        throw InvalidArgument("DecoderPipeline: the text encoder's hidden_size (" +
                              std::to_string(text_encoder_->config().hidden_size) +
                              ") differs from the decoder's clip_embd (" +
                              std::to_string(decoder_->config().clip_embd) + ")");
    const OffloadMode mode = offload_mode(kWhere, options_);
    if (mode == OffloadMode::sequential) {
        pin_module(*text_encoder_);  // page-locked, for asynchronous block copies
        pin_module(*decoder_);
        pin_module(*vqgan_);
    } else if (mode == OffloadMode::none) {
        // The models stay put: map all blocks' conditions at once, project q, k, v together,
        // and read the image embeddings before their mappers.
        text_encoder_->pack_attention_projections();
        decoder_->pack_condition_mappers();
        decoder_->pack_attention_projections();
        decoder_->fold_effnet_mappers();
    }
    if (!(std::isfinite(latent_dim_scale_) && latent_dim_scale_ > 0))
        throw InvalidArgument("DecoderPipeline: `latent_dim_scale` must be a positive number");
    scheduler_.validate();
}

DecoderPipeline DecoderPipeline::from_components(DecoderComponents components,
                                                 const LoadOptions& options) {
    return DecoderPipeline(std::move(components), options);
}

DecoderPipeline DecoderPipeline::from_pretrained(const std::string& dir,
                                                 const LoadOptions& options) {
    ModelIndex index;
    const std::string index_path = dir + "/model_index.json";
    if (path_exists(index_path)) index = ModelIndex::from_file(index_path);

    // Offloaded stages are loaded onto the CPU and moved per stage (or block) during a call.
    const OffloadMode mode = offload_mode(kWhere, options);
    check_dtype_on_device(kWhere, options.dtype, options.device);
    LoadOptions load = options;
    if (mode != OffloadMode::none) load.device = torch::kCPU;

    SchedulerConfig scheduler;
    const std::string scheduler_path = dir + "/scheduler/scheduler_config.json";
    if (path_exists(scheduler_path)) scheduler = SchedulerConfig::from_file(scheduler_path);

    DecoderComponents c{CLIPTokenizer::from_pretrained(dir + "/tokenizer"),
                        load_clip_text_model(dir + "/text_encoder", load),
                        load_diffnext(dir + "/decoder", load),
                        load_paella_vq(dir + "/vqgan", load),
                        scheduler,
                        index.latent_dim_scale};
    return DecoderPipeline(std::move(c), options);
}

std::vector<int64_t> DecoderPipeline::latent_shape(int64_t batch, int64_t h, int64_t w) const {
    check_usable();
    // int(image_embeddings.size(2) * latent_dim_scale): a double product, truncated.
    auto scaled = [this](int64_t size) {
        const double latent = static_cast<double>(size) * latent_dim_scale_;
        if (!(latent < 0x1p62))  // an int64 holds it
            invalid("image_embeddings", "has a size " + std::to_string(size) +
                                            " that latent_dim_scale " +
                                            c10::str(latent_dim_scale_) + " scales beyond 2^62");
        return static_cast<int64_t>(latent);
    };
    return {batch, decoder_->config().c_in, scaled(h), scaled(w)};
}

void DecoderPipeline::check_usable() const {
    if (moved_from()) throw InvalidArgument(std::string(kWhere) + ": this pipeline was moved from");
}

size_t DecoderPipeline::captured_graphs() const {
    check_usable();
    return graphs_->size();
}

size_t DecoderPipeline::captured_text_graphs() const {
    check_usable();
    return text_graphs_->size();
}

void DecoderPipeline::clear_graphs() {
    check_usable();
    graphs_->clear();
    text_graphs_->clear();
}

torch::Tensor DecoderPipeline::encode_prompt(const std::vector<std::string>& prompts) {
    check_usable();
    return with_memory_errors(kWhere, [&] {
        if (prompts.empty()) invalid("prompts", "is empty");
        const auto on = stage_scope(text_encoder_, options_.device, offload_mode(kWhere, options_));
        c10::InferenceMode guard;
        return encode_prompts_graphed(tokenizer_, text_encoder_, prompts, options_.device,
                                      module_dtype(*decoder_), text_graphs_.get(), options_,
                                      offload_mode(kWhere, options_));
    });
}

torch::Tensor DecoderPipeline::decode_latents(const torch::Tensor& latents) {
    check_usable();
    return with_memory_errors(kWhere, [&] {
        const auto& cfg = decoder_->config();
        if (!latents.defined() || latents.dim() != 4 || latents.size(1) != cfg.c_in ||
            latents.size(0) < 1)
            invalid("latents", "must have shape [B, " + std::to_string(cfg.c_in) + ", H, W], got " +
                                   (latents.defined() ? shape_string(latents.sizes())
                                                      : std::string("undefined")));
        return decode_latents_impl(latents);
    });
}

namespace {

// x on the host in float32. From CUDA: converted on the device, then copied into page-locked
// memory (libtorch's host allocator keeps such blocks for reuse). A copy that also converts goes
// through a pageable host buffer instead: for one 1024x1024 half image on an H100 machine that
// took 2.8 ms (2.2 GB/s), a tenth of the VQGAN decode.
torch::Tensor to_host_float32(const torch::Tensor& x) {
    if (!x.is_cuda()) return x.to(torch::kCPU, torch::kFloat32);
    const auto on_device = x.to(torch::kFloat32).contiguous();
    auto host = at::empty(
        on_device.sizes(),
        torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCPU).pinned_memory(true));
    host.copy_(on_device);  // returns when the copy has landed
    return host;
}

}  // namespace

torch::Tensor DecoderPipeline::decode_latents_impl(const torch::Tensor& latents) {
    // decode(latents * scale_factor).clamp(0, 1), on the host in float32
    const StageScope on(*vqgan_, options_.device, offload_mode(kWhere, options_));
    c10::InferenceMode guard;
    const auto scaled = in_memory_format(
        (latents * vqgan_->scale_factor()).to(module_device(*vqgan_), module_dtype(*vqgan_)),
        options_);
    return to_host_float32(vqgan_->decode(scaled).clamp(0, 1));
}

DecoderOutput DecoderPipeline::operator()(const DecoderOptions& options) {
    return call(options, nullptr);
}

DecoderOutput DecoderPipeline::call(const DecoderOptions& options, StepNoise* draws) {
    check_usable();
    return with_memory_errors(kWhere, [&] { return run(options, draws); });
}

std::vector<NoiseDraw> DecoderPipeline::planned_draws(const std::vector<int64_t>& latent_shape,
                                                      bool latents_given, int64_t steps) const {
    check_usable();
    // Latents and every step's noise in the decoder's dtype on the execution device.
    return std::vector<NoiseDraw>(static_cast<size_t>(steps + (latents_given ? 0 : 1)),
                                  {latent_shape, module_dtype(*decoder_), options_.device});
}

DecoderOutput DecoderPipeline::run(const DecoderOptions& opt, StepNoise* shared_draws) {
    const DiffNeXtConfig& dcfg = decoder_->config();
    const torch::Device device = options_.device;
    const torch::ScalarType dtype = module_dtype(*decoder_);
    const OffloadMode mode = offload_mode(kWhere, options_);

    // ---- 1. check every argument before any work
    torch::Tensor embeddings = opt.image_embeddings;
    if (embeddings.defined() && !opt.image_embeddings_list.empty())
        invalid("image_embeddings", "and `image_embeddings_list` are both set: pass one of them");
    if (!embeddings.defined()) {
        if (opt.image_embeddings_list.empty()) invalid("image_embeddings", "is required");
        for (size_t i = 0; i < opt.image_embeddings_list.size(); ++i) {
            const auto& e = opt.image_embeddings_list[i];
            const auto& first = opt.image_embeddings_list[0];
            if (!e.defined() || e.dim() != 4 || e.sizes().slice(1) != first.sizes().slice(1))
                invalid("image_embeddings_list",
                        "entry " + std::to_string(i) + " has shape " +
                            (e.defined() ? shape_string(e.sizes()) : std::string("undefined")) +
                            "; all entries must be [b, " + std::to_string(dcfg.effnet_embd) +
                            ", h, w] with the same h, w");
        }
        embeddings = at::cat(opt.image_embeddings_list, 0);
    }
    if (embeddings.dim() != 4 || embeddings.size(1) != dcfg.effnet_embd || embeddings.size(0) < 1 ||
        embeddings.size(2) < 1 || embeddings.size(3) < 1)
        invalid("image_embeddings", "must be [B, " + std::to_string(dcfg.effnet_embd) +
                                        ", h, w] (effnet_embd of the decoder), got " +
                                        shape_string(embeddings.sizes()));
    if (!embeddings.is_floating_point()) invalid("image_embeddings", "must be a floating tensor");
    const int64_t batch = embeddings.size(0);

    const bool has_embeds = opt.prompt_embeds.defined();
    const int64_t text_dim = text_encoder_->config().hidden_size;
    auto check_embeds = [&](const char* name, const torch::Tensor& t) {
        if (t.dim() != 3 || t.size(0) < 1 || t.size(1) < 1 || t.size(2) != text_dim ||
            !t.is_floating_point())
            invalid(name, "must be a floating tensor [P, L, " + std::to_string(text_dim) +
                              "] (the decoder text encoder's hidden size), got " +
                              shape_string(t.sizes()));
    };
    if (has_embeds) {
        const bool default_prompts =
            opt.prompts.empty() || (opt.prompts.size() == 1 && opt.prompts[0].empty());
        if (!default_prompts)
            invalid("prompts", "and `prompt_embeds` are both set: pass one of them");
        check_embeds("prompt_embeds", opt.prompt_embeds);
    }
    const int64_t n_prompts =
        has_embeds ? opt.prompt_embeds.size(0) : static_cast<int64_t>(opt.prompts.size());
    if (n_prompts != 1 && n_prompts != batch)
        invalid(has_embeds ? "prompt_embeds" : "prompts",
                "holds " + std::to_string(n_prompts) +
                    " prompts; it must hold 1 or one per image embedding (" +
                    std::to_string(batch) + ")");
    check_positive(kWhere, "num_images_per_prompt", opt.num_images_per_prompt);
    if (opt.timesteps.empty())
        check_positive(kWhere, "num_inference_steps", opt.num_inference_steps);
    else
        check_timesteps(kWhere, "timesteps", opt.timesteps);
    check_guidance_scale(kWhere, "guidance_scale", opt.guidance_scale, dtype);
    const bool cfg = opt.guidance_scale > 1.0;
    const bool has_negative_embeds = opt.negative_prompt_embeds.defined();
    if (has_negative_embeds && !opt.negative_prompts.empty())
        invalid("negative_prompts", "and `negative_prompt_embeds` are both set: pass one of them");
    if (has_negative_embeds) check_embeds("negative_prompt_embeds", opt.negative_prompt_embeds);
    const int64_t n_negative = has_negative_embeds
                                   ? opt.negative_prompt_embeds.size(0)
                                   : static_cast<int64_t>(opt.negative_prompts.size());
    if (cfg && n_negative > 1 && n_negative != n_prompts)
        invalid(has_negative_embeds ? "negative_prompt_embeds" : "negative_prompts",
                "holds " + std::to_string(n_negative) +
                    " prompts; it must hold none, 1 or one per prompt (" +
                    std::to_string(n_prompts) + ")");
    // Both halves of a guided batch go through one forward: the same token count.
    const int64_t encoded_len = tokenizer_.model_max_length();
    const int64_t prompt_len = has_embeds ? opt.prompt_embeds.size(1) : encoded_len;
    const int64_t negative_len =
        has_negative_embeds ? opt.negative_prompt_embeds.size(1) : encoded_len;
    if (cfg && prompt_len != negative_len)
        invalid(has_negative_embeds ? "negative_prompt_embeds" : "prompt_embeds",
                "has " + std::to_string(has_negative_embeds ? negative_len : prompt_len) +
                    " tokens but the " + (has_negative_embeds ? "prompt" : "negative prompt") +
                    " states have " +
                    std::to_string(has_negative_embeds ? prompt_len : negative_len) +
                    ": with guidance both halves need the same length");

    const int64_t per_embedding = opt.num_images_per_prompt;
    const int64_t rows = batch * per_embedding;
    const auto shape = latent_shape(rows, embeddings.size(2), embeddings.size(3));
    const int64_t multiple = decoder_->size_multiple();
    if (shape[2] < 1 || shape[3] < 1 || shape[2] % multiple != 0 || shape[3] % multiple != 0)
        invalid("image_embeddings",
                "has spatial size " + std::to_string(embeddings.size(2)) + "x" +
                    std::to_string(embeddings.size(3)) + ", which gives latents of " +
                    std::to_string(shape[2]) + "x" + std::to_string(shape[3]) +
                    " (latent_dim_scale " + c10::str(latent_dim_scale_) +
                    "); the decoder needs both divisible by " + std::to_string(multiple));
    check_allocatable(kWhere, "`image_embeddings`, `num_images_per_prompt` and latent_dim_scale",
                      shape, torch::kFloat32);
    if (opt.latents.defined()) check_shape(kWhere, "latents", opt.latents, shape);

    DDPMWuerstchenScheduler scheduler(scheduler_);
    if (opt.timesteps.empty())
        scheduler.set_timesteps(opt.num_inference_steps);
    else
        scheduler.set_timesteps(opt.timesteps);
    at::Generator generator = call_generator(opt.generator, opt.seed);

    // ---- 2. text: [P, 77, D] -> one row per output, then the negative half for guidance
    torch::Tensor text;
    {
        // Offload moves the text encoder only when some text is left to encode.
        const bool encodes_text = !has_embeds || (cfg && !has_negative_embeds);
        const auto on = stage_scope(text_encoder_, device, encodes_text ? mode : OffloadMode::none);
        c10::InferenceMode guard;
        const auto prompt_embeds =
            has_embeds ? opt.prompt_embeds.to(device, dtype)
                       : encode_distinct(tokenizer_, text_encoder_, opt.prompts, device, dtype,
                                         *text_graphs_, options_, mode);
        text = expand_rows(prompt_embeds, rows, per_embedding);
        if (cfg) {
            torch::Tensor negative_embeds;
            if (has_negative_embeds) {
                negative_embeds = opt.negative_prompt_embeds.to(device, dtype);
            } else {
                std::vector<std::string> negative = opt.negative_prompts;
                if (negative.empty()) negative.assign(static_cast<size_t>(n_prompts), "");
                negative_embeds = encode_distinct(tokenizer_, text_encoder_, negative, device,
                                                  dtype, *text_graphs_, options_, mode);
            }
            // One negative serves every prompt (expand_rows takes row 0 for all).
            text = at::cat({text, expand_rows(negative_embeds, rows, per_embedding)}, 0);
        }
    }

    // ---- 3. denoising loop (stage B)
    torch::Tensor latents;
    {
        const auto on = stage_scope(decoder_, device, mode);
        c10::InferenceMode guard;
        // Each embedding is repeated for its images (upstream forgets this; see the header).
        auto effnet = embeddings.to(device, dtype).repeat_interleave(per_embedding, 0);
        if (cfg) effnet = at::cat({effnet, at::zeros_like(effnet)}, 0);

        // The call's draws: the latents (unless given), then one per step in the scheduler, made
        // ahead on a worker while the device computes unless a step callback (which could draw
        // from the generator itself) runs between the steps.
        std::optional<StepNoise> own_draws;
        if (shared_draws == nullptr)
            own_draws.emplace(generator,
                              planned_draws(shape, opt.latents.defined(), scheduler.num_steps()),
                              /*ahead=*/!opt.callback);
        StepNoise& draws = shared_draws != nullptr ? *shared_draws : *own_draws;
        latents =
            opt.latents.defined() ? contiguous_on(opt.latents, device, dtype) : draws.next(shape);
        latents = latents * DDPMWuerstchenScheduler::kInitNoiseSigma;

        // The image embeddings and text states as the blocks read them, mapped once for all
        // steps (graph inputs copied once per call).
        const DiffNeXtCondition condition =
            decoder_->map_condition(effnet, text, shape[2], shape[3],
                                    /*project_kv=*/projects_text_kv(options_, device));
        const std::vector<torch::Tensor> condition_tensors = condition.tensors();
        const double guidance = opt.guidance_scale;
        auto graph_key = graphs_->prepare_call(options_, mode, device, *decoder_, cfg, guidance);
        // The folded and the mapped forms of the image embeddings run different blocks' code
        // (and can have the same shapes): one graph each.
        if (graph_key && condition.effnet_folded) *graph_key += "|effnet folded";
        // Every step's timestep and schedule factors at once, on the device, and, when the
        // timestep mappers are packed, every step's modulations of the blocks in one product (a
        // step then reads its row instead of embedding and mapping its ratio).
        const SchedulerStepPlan plan = scheduler.plan_steps(dtype, device);
        const MappedTimesteps modulations = decoder_->map_timesteps(plan.timesteps);
        if (graph_key && modulations.residual_biases_folded)
            *graph_key += "|residual biases folded";
        // One denoising step: the decoder on [latents ; latents] for guidance (one batched
        // forward), mixed as lerp(uncond, text, guidance_scale). in[1] is the step's row of
        // `modulations` (for every sample), else its ratio per sample.
        const StepGraphs::Step denoise = [&](const std::vector<torch::Tensor>& in) {
            const auto x = in_memory_format(in[0], options_);
            const auto mapped = condition.with_tensors({in.begin() + 2, in.end()});
            const auto run = [&](const torch::Tensor& batch) {
                if (modulations.defined())
                    return decoder_->forward(batch, modulations.with_rows(in[1]), mapped);
                return decoder_->forward(batch, cfg ? at::cat({in[1], in[1]}, 0) : in[1], mapped);
            };
            if (!cfg) return run(x);
            auto halves = run(at::cat({x, x}, 0)).chunk(2, 0);  // text, uncond
            return at::lerp(halves[1], halves[0], guidance);
        };
        const CallbackWeightsWatch watch(*decoder_, opt.callback && mode == OffloadMode::none, [&] {
            decoder_->check_condition(condition);
            if (modulations.defined())
                nn::check_mapped_timesteps(modulations.row(0), decoder_->offload_units(), 1,
                                           modulations.rows.device(),
                                           modulations.rows.scalar_type(), "WuerstchenDiffNeXt");
        });
        for (int i = 0; i < plan.steps(); ++i) {
            // The step's row of modulations, else ratio = t.expand(B).to(dtype), on the device
            // (no host round trip).
            std::vector<torch::Tensor> inputs = {
                latents, modulations.defined() ? modulations.row(i).rows : plan.timestep(i, rows)};
            inputs.insert(inputs.end(), condition_tensors.begin(), condition_tensors.end());
            const torch::Tensor predicted =
                graph_key ? graphs_->run(inputs, *graph_key, denoise, condition_tensors.size())
                          : denoise(inputs);
            latents = scheduler.step(predicted, plan, i, latents, draws.next(shape));

            if (opt.callback) {
                torch::Tensor shown = latents;
                const double t = plan.points[static_cast<size_t>(i)];
                if (!opt.callback(i, t, shown))
                    throw Cancelled("DecoderPipeline: cancelled by the step callback after step " +
                                    std::to_string(i));
                if (i + 1 < plan.steps()) watch.check(kWhere, "decoder", i);
                if (!shown.is_same(latents)) {
                    check_shape("DecoderPipeline callback", "latents", shown, shape);
                    latents = contiguous_on(shown, device, dtype, /*copy=*/true);
                }
            }
        }
    }

    DecoderOutput out;
    out.latents = latents;
    if (!opt.decode) return out;

    // ---- 4. VQGAN (stage A)
    out.images = decode_latents_impl(latents);
    return out;
}

}  // namespace wuerstchen
