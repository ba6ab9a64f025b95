#pragma once

// Stage B: diffusers' WuerstchenDiffNeXt, the decoder that denoises VQGAN latents conditioned on
// the stage-C image embeddings ("effnet") and CLIP text states. Child names are the diffusers
// attribute names with Sequential / ModuleList indices kept, so the module tree is the weight map
// (decoder/diffusion_pytorch_model.safetensors).

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "wuerstchen/block_hook.h"
#include "wuerstchen/config.h"
#include "wuerstchen/mapped_timesteps.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

namespace nn {
struct ConditionSource;
}  // namespace nn

// The decoder's conditions as its blocks read them (WuerstchenDiffNeXtImpl::map_condition): the
// same for every denoising step of a call, so a pipeline maps them once per call.
struct DiffNeXtCondition {
    torch::Tensor clip;             // gen_c_embeddings(clip): [B, L, c_cond], or undefined
    // When packed: each AttnBlock's kv_mapper(clip) [B, L, c], in order; with map_condition's
    // project_kv, the block's keys and values of that instead ([B, L, 2c], k then
    // v: computed once per call rather than every step).
    std::vector<torch::Tensor> kv;
    // What map_condition mapped it with, as it was: clip_mapper, the kv_mappers (when packed),
    // the effnet mappers (unless folded) and, with projected keys and values, the to_k / to_v
    // weights. A forward refuses the condition once those are replaced or changed (or their LoRA
    // state is). with_tensors() keeps it; without one (a condition made by hand) nothing is
    // checked, except that projected keys and values are refused.
    std::shared_ptr<const nn::ConditionSource> source;
    // Per effnet_mappers index: the image embeddings resized to that level's size and mapped,
    // [B, c_cond, h_level, w_level]; undefined for the levels without a mapper. When
    // effnet_folded, resized only ([B, effnet_embd, h_level, w_level]): the blocks' first
    // layers apply the mappers (WuerstchenDiffNeXtImpl::fold_effnet_mappers).
    std::vector<torch::Tensor> effnet;
    bool effnet_folded = false;
    // The defined tensors in order (clip, kv, effnet): what a CUDA graph of a step takes.
    std::vector<torch::Tensor> tensors() const;
    // This condition's layout with `tensors` (as tensors() gives them) in place of its own.
    DiffNeXtCondition with_tensors(const std::vector<torch::Tensor>& tensors) const;
};

struct WuerstchenDiffNeXtImpl : torch::nn::Module {
    explicit WuerstchenDiffNeXtImpl(const DiffNeXtConfig& config);

    // x: [B, c_in, H, W] noisy latents (H, W divisible by patch_size * 2^(levels-1)),
    // r: [B] noise ratios in [0, 1], effnet: [B, effnet_embd, h, w] image embeddings (any size:
    // resized per level), clip: [B, L, clip_embd] text states or undefined.
    // Returns the predicted noise (x - a) / b: [B, c_out, H, W] (c_out must equal c_in).
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& r,
                          const torch::Tensor& effnet, const torch::Tensor& clip = {});
    // The same with the conditions already mapped by map_condition for x's height and width.
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& r,
                          const DiffNeXtCondition& condition);
    // The same with r's modulations mapped ahead: `t` = map_timesteps(r) for x's batch, or a
    // row() of it for a batch at one ratio. Throws InvalidArgument when t is undefined, not
    // such rows, or stale: the mappers' (or folded residual biases') tensors replaced or changed
    // since, a LoRA adapter on them added or enabled, or autograd on (see MappedTimesteps).
    torch::Tensor forward(const torch::Tensor& x, const MappedTimesteps& t,
                          const DiffNeXtCondition& condition);
    // As WuerstchenPriorImpl::map_timesteps: r: [N] -> every timestep block's modulation for
    // each (down levels, then up levels), in one product when the timestep mappers are packed
    // and usable; else undefined.
    MappedTimesteps map_timesteps(const torch::Tensor& r);
    // effnet and clip as forward takes them, mapped for latents of `height` x `width` (x's last
    // two sizes): the text states by clip_mapper and, when packed, every attention block's
    // kv_mapper; the image embeddings resized to each injecting level's size and mapped. Does not
    // depend on x's values or r. Throws InvalidArgument naming a bad argument. project_kv: as
    // WuerstchenPriorImpl::map_condition's (the attention blocks' text keys and values). Valid
    // while the modules that mapped it stay as they are (see `source`).
    DiffNeXtCondition map_condition(const torch::Tensor& effnet, const torch::Tensor& clip,
                                    int64_t height, int64_t width, bool project_kv = false);
    // As WuerstchenPriorImpl::check_condition: throws InvalidArgument when `condition`'s source
    // no longer holds (forward also checks that the effnet fold it was mapped for still holds).
    void check_condition(const DiffNeXtCondition& condition) const;

    // [B, L, clip_embd] -> [B, L, c_cond]: clip_mapper then seq_norm.
    torch::Tensor gen_c_embeddings(const torch::Tensor& clip);

    const DiffNeXtConfig& config() const { return config_; }
    // The factor the spatial size of x must be divisible by: patch_size * 2^(levels - 1).
    int64_t size_multiple() const;

    // As WuerstchenPriorImpl::pack_condition_mappers: every AttnBlock's kv_mapper and every
    // TimestepBlock's mapper (down levels, then up levels) in one buffer per kind, so forward
    // maps the text condition and the r-embedding for all blocks in one product each; and, when
    // every residual block is followed by a timestep block (the level configs "CT" and "CTA"),
    // the residual blocks' last biases, which forward then moves into those blocks' shifts.
    bool pack_condition_mappers();
    // As WuerstchenPriorImpl::pack_attention_projections: each AttnBlock's to_q, to_k and to_v
    // in one buffer, projected in one product.
    bool pack_attention_projections();
    // Each level's effnet mapper is a 1x1 convolution (linear), and the first channelwise layer
    // of each residual block that reads its output is linear too: the block can take the
    // level's resized image embeddings (effnet_embd channels) instead of the mapped ones
    // (c_cond), with the two weights multiplied together. This stores each such layer's weight
    // with effnet_embd spare columns in front of it (the parameters keep their names, shapes
    // and values; extra memory effnet_embd / (c + c_skip) of those weights) and writes the
    // products there: at the real sizes a decoder step does about a sixth less arithmetic.
    // map_condition and forward only read them, and use them while those weights and the
    // mappers' are the ones folded (the same tensors, not changed in place since); otherwise
    // map_condition maps per level, until this runs again. Like the packing above, anything that
    // replaces the weights undoes it. The loaders and pipelines call it unless offloading; call
    // it again after changing the weights in place, and not while the model runs. Writes that
    // no version counter sees (through Tensor::data() or a raw pointer) need `again`, which
    // makes every product anew. Returns whether every such block is folded (without `again`, a
    // no-op for those already folded).
    bool fold_effnet_mappers(bool again = false);

    // Sequential offload: every block of down_blocks then up_blocks (level samplers included) in
    // execution order; forward calls block_hook around each when it is set.
    std::vector<torch::nn::Module*> offload_units() const;
    BlockHook* block_hook = nullptr;

    torch::nn::Linear clip_mapper{nullptr};
    // Holds effnet_mappers.<i> for the levels that inject the image embeddings; indices run over
    // inject_effnet followed by reversed(inject_effnet) (down levels, then up levels).
    std::shared_ptr<torch::nn::Module> effnet_mappers;
    std::vector<torch::nn::Conv2d> effnet_mapper_list;  // one entry per index; null when absent
    torch::nn::Sequential embedding{nullptr};           // {PixelUnshuffle, Conv2d 1x1, LN2d}
    torch::nn::ModuleList down_blocks{nullptr};         // per level: [sampler,] blocks
    torch::nn::ModuleList up_blocks{nullptr};  // per level (deepest first): blocks[, sampler]
    torch::nn::Sequential clf{nullptr};        // {LN2d, Conv2d 1x1, PixelShuffle}

private:
    struct Conditions;  // what the blocks of one forward read (diffnext.cpp)
    std::vector<torch::Tensor> down_encode(torch::Tensor x, Conditions& conditions);
    torch::Tensor up_decode(const std::vector<torch::Tensor>& level_outputs,
                            Conditions& conditions);
    // A ResBlockStageB, with the level's skip (or undefined) and the condition's effnet entry
    // at mapper_index.
    torch::Tensor run_res_block(torch::nn::Module& block, const torch::Tensor& x,
                                const torch::Tensor& level_skip, const Conditions& conditions,
                                size_t mapper_index);
    // An AttnBlock, TimestepBlock or level sampler.
    torch::Tensor run_other_block(const std::shared_ptr<torch::nn::Module>& block,
                                  const torch::Tensor& x, Conditions& conditions);
    // The spatial size at which effnet_mapper_list[index] injects, for latents height x width.
    std::pair<int64_t, int64_t> mapper_level_size(size_t index, int64_t height,
                                                  int64_t width) const;
    // x: [B, c_in, H, W] with H, W divisible by size_multiple(), r: [B]; InvalidArgument else.
    void check_input(const torch::Tensor& x, const torch::Tensor& r) const;
    void check_latents(const torch::Tensor& x) const;  // x alone
    // The blocks, reading t when defined, else r_embed ([B, c_r]).
    torch::Tensor forward_blocks(const torch::Tensor& x, const MappedTimesteps& t,
                                 const torch::Tensor& r_embed, const DiffNeXtCondition& condition);

    DiffNeXtConfig config_;
};
TORCH_MODULE(WuerstchenDiffNeXt);

// Builds the model from <dir>/config.json and loads <dir>/diffusion_pytorch_model.safetensors
// (or its shards / fp16 variant). Throws ConfigError, IoError or WeightError naming the file.
WuerstchenDiffNeXt load_diffnext(const std::string& dir, const LoadOptions& options = {});

}  // namespace wuerstchen
