#include "wuerstchen/prior.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "nn/blocks.h"
#include "nn/functional.h"
#include "nn/init.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/pipeline_common.h"

namespace wuerstchen {

WuerstchenPriorImpl::WuerstchenPriorImpl(const PriorConfig& config) : config_(config) {
    config_.validate();
    const int64_t c_in = config.c_in, c = config.c, c_cond = config.c_cond, c_r = config.c_r;
    projection = register_module("projection", nn::conv2d(torch::nn::Conv2dOptions(c_in, c, 1)));
    cond_mapper = register_module(
        "cond_mapper", torch::nn::Sequential(
                           LoraLinear(c_cond, c),
                           torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.2)),
                           LoraLinear(c, c)));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int i = 0; i < config.depth; ++i) {
        nn::ResBlock res(c);
        nn::TimestepBlock ts(c, c_r);
        nn::AttnBlock attn(c, c, config.nhead, /*self_attn=*/true);
        blocks->push_back(res);
        blocks->push_back(ts);
        blocks->push_back(attn);
        res_blocks_.push_back(res.ptr());
        timestep_blocks_.push_back(ts.ptr());
        attn_blocks_.push_back(attn.ptr());
    }
    out = register_module("out", std::make_shared<torch::nn::Module>("Sequential"));
    out_conv = out->register_module("1", nn::conv2d(torch::nn::Conv2dOptions(c, c_in * 2, 1)));
}

torch::Tensor WuerstchenPriorImpl::gen_r_embedding(const torch::Tensor& r) const {
    return nn::r_embedding(r, config_.c_r);
}

bool WuerstchenPriorImpl::pack_condition_mappers() {
    return nn::pack_condition_mappers(offload_units());
}

bool WuerstchenPriorImpl::pack_attention_projections() {
    return nn::pack_attention_projections(offload_units());
}

std::vector<torch::Tensor> PriorCondition::tensors() const {
    std::vector<torch::Tensor> out{c_embed};
    out.insert(out.end(), kv.begin(), kv.end());
    return out;
}

PriorCondition PriorCondition::from_tensors(std::vector<torch::Tensor> tensors) {
    PriorCondition condition;
    if (tensors.empty()) return condition;
    condition.c_embed = std::move(tensors[0]);
    condition.kv.assign(std::make_move_iterator(tensors.begin() + 1),
                        std::make_move_iterator(tensors.end()));
    return condition;
}

PriorCondition PriorCondition::with_tensors(std::vector<torch::Tensor> tensors) const {
    if (tensors.size() != kv.size() + 1)
        throw InvalidArgument("PriorCondition::with_tensors: " + std::to_string(tensors.size()) +
                              " tensors for a layout of " + std::to_string(kv.size() + 1));
    PriorCondition out = from_tensors(std::move(tensors));
    out.source = source;
    return out;
}

namespace {

// The modules that map_condition runs: cond_mapper, and the kv_mappers when they were packed.
nn::NamedModules condition_mappers(const WuerstchenPriorImpl& prior, bool kv_mapped) {
    nn::NamedModules out{{"cond_mapper", prior.cond_mapper.ptr().get()}};
    if (kv_mapped) nn::add_kv_mappers(prior.offload_units(), out);
    return out;
}

}  // namespace

PriorCondition WuerstchenPriorImpl::map_condition(const torch::Tensor& c, bool project_kv) {
    const torch::ScalarType dtype = module_dtype(*this);
    if (!c.defined() || c.dim() != 3 || c.size(2) != config_.c_cond || c.scalar_type() != dtype)
        throw InvalidArgument("WuerstchenPrior: c must be [B, L, " +
                              std::to_string(config_.c_cond) + "] in the model's " +
                              c10::toString(dtype) + ", got " + nn::describe(c));
    PriorCondition condition;
    condition.c_embed = cond_mapper->forward(c);  // [B, L, c_cond] -> [B, L, c]
    nn::MappedKv mapped = nn::map_kv_packed(offload_units(), condition.c_embed, project_kv);
    condition.kv = std::move(mapped.kv);
    condition.source = nn::note_condition_source(condition_mappers(*this, !condition.kv.empty()),
                                                 std::move(mapped.projected));
    return condition;
}

void WuerstchenPriorImpl::check_condition(const PriorCondition& condition) const {
    nn::check_condition_source(condition.kv, condition.source.get(),
                               condition_mappers(*this, !condition.kv.empty()), offload_units(),
                               "WuerstchenPrior");
}

torch::Tensor WuerstchenPriorImpl::forward(const torch::Tensor& x_in, const torch::Tensor& r,
                                           const torch::Tensor& c) {
    return forward(x_in, r, map_condition(c));
}

MappedTimesteps WuerstchenPriorImpl::map_timesteps(const torch::Tensor& r) {
    nn::check_ratios("WuerstchenPrior::map_timesteps", r, module_dtype(*this), /*batch=*/-1);
    return nn::map_timesteps_ahead(offload_units(), gen_r_embedding(r));
}

torch::Tensor WuerstchenPriorImpl::forward(const torch::Tensor& x_in, const torch::Tensor& r,
                                           const PriorCondition& condition) {
    check_latents(x_in);
    // One ratio per sample, or one for the whole batch (upstream broadcasts it).
    nn::check_ratios("WuerstchenPrior", r, x_in.scalar_type(), x_in.size(0), /*one_for_all=*/true);
    // Every block's mapping of r's embedding in one product, when packed, with the residual
    // blocks' last biases moved into it (each residual block then sums its product into its
    // input); else each block maps its own.
    const auto r_embed = gen_r_embedding(r);  // [B] -> [B, c_r]
    const auto units = offload_units();
    const MappedTimesteps t = nn::map_timesteps_packed(nn::timestep_mappers(units), units, r_embed);
    return forward_blocks(x_in, t, t.defined() ? torch::Tensor() : r_embed, condition);
}

torch::Tensor WuerstchenPriorImpl::forward(const torch::Tensor& x_in, const MappedTimesteps& t,
                                           const PriorCondition& condition) {
    check_latents(x_in);
    nn::check_mapped_timesteps(t, offload_units(), x_in.size(0), x_in.device(), x_in.scalar_type(),
                               "WuerstchenPrior");
    return forward_blocks(x_in, t, {}, condition);
}

torch::Tensor WuerstchenPriorImpl::forward_blocks(const torch::Tensor& x_in,
                                                  const MappedTimesteps& t,
                                                  const torch::Tensor& r_embed,
                                                  const PriorCondition& condition) {
    const torch::Tensor& c_embed = condition.c_embed;
    const std::vector<torch::Tensor>& kv_all = condition.kv;
    const int64_t batch = x_in.size(0);
    // Guidance pairs: a condition for twice x's batch ([text ; uncond]) takes x for both halves.
    const bool pairs = c_embed.defined() && c_embed.dim() == 3 && c_embed.size(0) == 2 * batch;
    // [c_embed's batch, L, c] (or [.., 2c]: keys and values projected ahead, with `projected`).
    auto fits = [&](const torch::Tensor& mapped, bool projected) {
        return mapped.defined() && mapped.dim() == 3 && mapped.size(0) == c_embed.size(0) &&
               mapped.size(1) == c_embed.size(1) &&
               (mapped.size(2) == config_.c || (projected && mapped.size(2) == 2 * config_.c)) &&
               mapped.scalar_type() == x_in.scalar_type();
    };
    if (!c_embed.defined() || c_embed.dim() != 3 || (c_embed.size(0) != batch && !pairs) ||
        !fits(c_embed, false) || (!kv_all.empty() && kv_all.size() != attn_blocks_.size()) ||
        !std::all_of(kv_all.begin(), kv_all.end(),
                     [&](const torch::Tensor& kv) { return fits(kv, true); }))
        throw InvalidArgument(
            "WuerstchenPrior: the condition must be map_condition's for a batch of " +
            std::to_string(batch) + " (or of " + std::to_string(2 * batch) +
            ", guidance pairs for the same x), in x's dtype");
    check_condition(condition);
    const nn::LinearGroup t_group = nn::timestep_mappers(offload_units());
    // Per-sample modulations (rows or r_embed of x's batch) follow x when it doubles.
    torch::Tensor rows = t.rows, r_rows = r_embed;
    auto x = projection->forward(x_in);  // [B, c_in, H, W] -> [B, c, H, W]
    for (size_t i = 0; i < res_blocks_.size(); ++i) {
        x = run_unit(block_hook, *res_blocks_[i],
                     [&] { return res_blocks_[i]->forward(x, {}, t.residual_biases_folded); });
        x = run_unit(block_hook, *timestep_blocks_[i], [&] {
            return rows.defined()
                       ? timestep_blocks_[i]->modulate_scaled(x, t_group.columns(rows, i))
                       : timestep_blocks_[i]->forward(x, r_rows);
        });
        if (pairs && i == 0) {
            // Up to here both halves compute the same (only the attention blocks read the
            // condition): the first residual and timestep blocks ran once for both.
            x = torch::cat({x, x});
            if (rows.defined() && rows.size(0) > 1) rows = torch::cat({rows, rows});
            if (r_rows.defined() && r_rows.size(0) > 1) r_rows = torch::cat({r_rows, r_rows});
        }
        x = run_unit(block_hook, *attn_blocks_[i], [&] {
            return !kv_all.empty() ? attn_blocks_[i]->forward_mapped(x, kv_all[i])
                                   : attn_blocks_[i]->forward(x, c_embed);
        });
    }
    if (pairs && res_blocks_.empty()) x = torch::cat({x, x});
    // [B, c, H, W] -> a, b: [B, c_in, H, W]
    auto ab = out_conv->forward(nn::layer_norm_2d(x)).chunk(2, 1);
    const auto x_out = pairs ? torch::cat({x_in, x_in}) : x_in;
    // contiguous(): NCHW order also when the weights are channels-last (a no-op otherwise).
    return ((x_out - ab[0]) / ((1 - ab[1]).abs() + 1e-5)).contiguous();
}

void WuerstchenPriorImpl::check_latents(const torch::Tensor& x) const {
    nn::check_nchw("WuerstchenPrior", "x", x, config_.c_in, module_dtype(*this));
}

std::vector<torch::nn::Module*> WuerstchenPriorImpl::offload_units() const {
    std::vector<torch::nn::Module*> units;
    for (size_t i = 0; i < res_blocks_.size(); ++i) {
        units.push_back(res_blocks_[i].get());
        units.push_back(timestep_blocks_[i].get());
        units.push_back(attn_blocks_[i].get());
    }
    return units;
}

WuerstchenPrior load_prior(const std::string& dir, const LoadOptions& options) {
    const auto config = PriorConfig::from_file(dir + "/config.json");
    auto model = build_unwritten<WuerstchenPrior>(config);
    load_weights(*model, find_weight_files(dir, "diffusion_pytorch_model"), options);
    prepare_module(*model, options);
    if (!options.offload && !options.sequential_offload) {
        model->pack_condition_mappers();
        model->pack_attention_projections();
    }
    return model;
}

}  // namespace wuerstchen
