#pragma once

// Stage C: diffusers' WuerstchenPrior, which denoises the 16-channel image embeddings ("effnet"
// latents) conditioned on CLIP text states. Child names are the diffusers attribute names with
// Sequential / ModuleList indices kept, so the module tree is the weight map of
// prior/diffusion_pytorch_model.safetensors.

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <vector>

#include "wuerstchen/block_hook.h"
#include "wuerstchen/config.h"
#include "wuerstchen/mapped_timesteps.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

namespace nn {
struct ResBlockImpl;
struct TimestepBlockImpl;
struct AttnBlockImpl;
struct ConditionSource;
}  // namespace nn

// The text condition as the prior's blocks read it (WuerstchenPriorImpl::map_condition): the
// same for every denoising step of a call, so a pipeline maps it once per call.
struct PriorCondition {
    torch::Tensor c_embed;          // cond_mapper(c): [B, L, c]
    // When packed: each AttnBlock's kv_mapper(c_embed) [B, L, c], in order; with
    // map_condition's project_kv, the block's keys and values of that instead
    // ([B, L, 2c], k then v: computed once per call rather than every step).
    std::vector<torch::Tensor> kv;
    // What map_condition mapped it with, as it was: cond_mapper, the kv_mappers (when packed)
    // and, with projected keys and values, the to_k / to_v weights. A forward refuses the
    // condition once those are replaced or changed (or their LoRA state is). with_tensors()
    // keeps it; without one (from_tensors, a condition made by hand) nothing is checked, except
    // that projected keys and values are refused.
    std::shared_ptr<const nn::ConditionSource> source;
    // c_embed, then kv: what a CUDA graph of a step takes as inputs.
    std::vector<torch::Tensor> tensors() const;
    // The inverse of tensors() (without a source).
    static PriorCondition from_tensors(std::vector<torch::Tensor> tensors);
    // This condition's source with `tensors` (as tensors() gives them) in place of its own.
    PriorCondition with_tensors(std::vector<torch::Tensor> tensors) const;
};

struct WuerstchenPriorImpl : torch::nn::Module {
    explicit WuerstchenPriorImpl(const PriorConfig& config);

    // x: [B, c_in, H, W] noisy embeddings, r: [B] noise ratios in [0, 1],
    // c: [B, L, c_cond] text states -> [B, c_in, H, W]: (x - a) / (|1 - b| + 1e-5). A c of 2B
    // rows is guidance pairs (see below): the result is then [2B, c_in, H, W].
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& r, const torch::Tensor& c);
    // The same with c already mapped by map_condition (which does not depend on x or r). A
    // condition mapped for twice x's batch (classifier-free guidance: [text ; uncond]) takes x
    // and r for both halves: the result is forward([x ; x], [r ; r], condition), [2B, ...],
    // with the blocks before the first attention block (which do not read the condition) run
    // once for both.
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& r,
                          const PriorCondition& condition);
    // The same with r's modulations mapped ahead (guidance pairs as above): `t` =
    // map_timesteps(r) for x's batch, or a row() of it for a batch at one ratio. Throws
    // InvalidArgument when t is undefined, not such rows, or stale: the mappers' (or folded
    // residual biases') tensors replaced or changed since, a LoRA adapter on them added or enabled,
    // or autograd on (see MappedTimesteps).
    torch::Tensor forward(const torch::Tensor& x, const MappedTimesteps& t,
                          const PriorCondition& condition);
    // r: [N] noise ratios -> every timestep block's modulation for each, in one product, when
    // the timestep mappers are packed (pack_condition_mappers), on r's device, and no LoRA
    // adapter on them contributes; else undefined (forward then needs r). A pipeline maps all
    // of a call's ratios at once, so that a step reads a row instead of embedding r and mapping
    // it. Throws InvalidArgument when r is not [N].
    MappedTimesteps map_timesteps(const torch::Tensor& r);
    // c: [B, L, c_cond] -> cond_mapper(c) and, when the kv_mappers are packed
    // (pack_condition_mappers) and no LoRA adapter on them contributes, every attention block's
    // mapping of it in one product. Throws InvalidArgument for another shape.
    // project_kv (what the pipelines pass per LoadOptions::project_text_kv, by default on the
    // CPU): each self-attention block whose projections are packed and usable
    // (pack_attention_projections; no LoRA adapter on them contributing, autograd off) gets the
    // keys and values of its mapping instead, so that a step projects only x's rows. A condition
    // holds only while the modules that mapped it stay as they are: map it again after changing
    // them or their LoRA state (forward refuses it once they were replaced or changed in place, or
    // projections cannot run packed: `source`; a pipeline maps once per call).
    PriorCondition map_condition(const torch::Tensor& c, bool project_kv = false);
    // Throws InvalidArgument when `condition` has a source (map_condition's) that no longer holds:
    // a module that mapped it was replaced or changed in place since, or its LoRA state changed
    // (as forward would). A condition without a source passes unless it has projected keys and
    // values.
    void check_condition(const PriorCondition& condition) const;

    // Sinusoidal embedding of r: [B] -> [B, c_r] in r's dtype (zero-padded when c_r is odd).
    torch::Tensor gen_r_embedding(const torch::Tensor& r) const;

    const PriorConfig& config() const { return config_; }

    // Stores the weights of the blocks' condition mappers (every AttnBlock's kv_mapper, every
    // TimestepBlock's mapper) back to back, one buffer per kind, so that forward maps the text
    // condition and the r-embedding for all blocks in one matrix product each instead of one per
    // block. The parameters keep their names, shapes and values, and no weight memory is added.
    // The loaders and pipelines call it unless offloading. Anything that later replaces those
    // weights (a move to another device, a LoRA fuse) undoes it; forward then maps per block, as
    // it does while an unfused LoRA adapter on a mapper contributes. It also stores the residual
    // blocks' last biases (channelwise.4.bias) back to back, so that forward can move them into
    // the timestep blocks' mapped shifts and sum each residual block's last product into its
    // input (nn::ResidualBiases). Returns whether both kinds of mapper are packed (a no-op when
    // they already are).
    bool pack_condition_mappers();
    // The same for each attention block's to_q, to_k and to_v: one buffer per block, so that its
    // forward projects queries, keys and values in one matrix product instead of three (with the
    // same conditions as above). Returns whether every block's are packed.
    bool pack_attention_projections();

    // Sequential offload: the blocks (ResBlock, TimestepBlock, AttnBlock per depth) in execution
    // order; forward calls block_hook around each when it is set.
    std::vector<torch::nn::Module*> offload_units() const;
    BlockHook* block_hook = nullptr;

    torch::nn::Conv2d projection{nullptr};
    torch::nn::Sequential cond_mapper{nullptr};  // {0: Linear, 1: LeakyReLU(0.2), 2: Linear}
    torch::nn::ModuleList blocks{nullptr};       // depth x [ResBlock, TimestepBlock, AttnBlock]
    std::shared_ptr<torch::nn::Module> out;      // {0: LayerNorm2d (no weights), 1: Conv2d 1x1}
    torch::nn::Conv2d out_conv{nullptr};         // out.1

private:
    // x: [B, c_in, H, W]; InvalidArgument else.
    void check_latents(const torch::Tensor& x) const;
    // The blocks, reading t when defined, else r_embed ([B, c_r]).
    torch::Tensor forward_blocks(const torch::Tensor& x, const MappedTimesteps& t,
                                 const torch::Tensor& r_embed, const PriorCondition& condition);
    PriorConfig config_;
    std::vector<std::shared_ptr<nn::ResBlockImpl>> res_blocks_;
    std::vector<std::shared_ptr<nn::TimestepBlockImpl>> timestep_blocks_;
    std::vector<std::shared_ptr<nn::AttnBlockImpl>> attn_blocks_;
};
TORCH_MODULE(WuerstchenPrior);

// Builds the model from <dir>/config.json and loads <dir>/diffusion_pytorch_model.safetensors
// (or its shards / fp16 variant), in eval mode on options.device / options.dtype.
// Throws ConfigError, IoError or WeightError naming the file.
WuerstchenPrior load_prior(const std::string& dir, const LoadOptions& options = {});

}  // namespace wuerstchen
