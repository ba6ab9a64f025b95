#include "wuerstchen/prior.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>

#include <vector>

#include "nn/blocks.h"
#include "nn/init.h"
#include "wuerstchen/lora.h"

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

torch::Tensor WuerstchenPriorImpl::forward(const torch::Tensor& x_in, const torch::Tensor& r,
                                           const torch::Tensor& c) {
    auto x = projection->forward(x_in);      // [B, c_in, H, W] -> [B, c, H, W]
    auto c_embed = cond_mapper->forward(c);  // [B, L, c_cond] -> [B, L, c]
    auto r_embed = gen_r_embedding(r);       // [B] -> [B, c_r]
    // Every block's mapping of the condition and of r_embed in one product each, when packed
    // (kv_mapper is SiLU then Linear); else each block maps its own.
    const auto blocks = offload_units();
    const nn::LinearGroup kv_group = nn::kv_mappers(blocks);
    const nn::LinearGroup t_group = nn::timestep_mappers(blocks);
    std::vector<torch::Tensor> kv_all;  // contiguous per block: the attention's join is faster
    torch::Tensor t_all;
    if (kv_group.ready(c_embed.device()))
        kv_all = kv_group.split(kv_group.forward(at::silu(c_embed)));
    if (t_group.ready(r_embed.device())) {
        t_all = t_group.forward(r_embed);
        nn::add_one_to_scales(t_group, t_all);
    }
    for (size_t i = 0; i < res_blocks_.size(); ++i) {
        x = run_unit(block_hook, *res_blocks_[i], [&] { return res_blocks_[i]->forward(x); });
        x = run_unit(block_hook, *timestep_blocks_[i], [&] {
            return t_all.defined()
                       ? timestep_blocks_[i]->modulate_scaled(x, t_group.columns(t_all, i))
                       : timestep_blocks_[i]->forward(x, r_embed);
        });
        x = run_unit(block_hook, *attn_blocks_[i], [&] {
            return !kv_all.empty() ? attn_blocks_[i]->forward_mapped(x, kv_all[i])
                                   : attn_blocks_[i]->forward(x, c_embed);
        });
    }
    // [B, c, H, W] -> a, b: [B, c_in, H, W]
    auto ab = out_conv->forward(nn::layer_norm_2d(x)).chunk(2, 1);
    // contiguous(): NCHW order also when the weights are channels-last (a no-op otherwise).
    return ((x_in - ab[0]) / ((1 - ab[1]).abs() + 1e-5)).contiguous();
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
