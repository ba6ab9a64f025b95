#include "wuerstchen/diffnext.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/container/functional.h>
#include <torch/nn/modules/pixelshuffle.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "nn/blocks.h"
#include "nn/functional.h"
#include "nn/init.h"
#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"

namespace wuerstchen {

namespace {

constexpr double kOutputEps = 1e-3;  // forward(eps=1e-3) upstream

// Stage B's residual block (ResBlockStageB upstream): the depthwise conv sees x only, the skip
// joins after the norm, in front of the channelwise MLP.
struct ResBlockStageBImpl : torch::nn::Module {
    // c_skip: all skip channels, of which the last c_effnet_ are the level's mapped image
    // embeddings.
    ResBlockStageBImpl(int64_t c, int64_t c_skip_, int64_t kernel_size, int64_t c_effnet_)
        : c_skip(c_skip_), c_effnet(c_effnet_) {
        depthwise = register_module(
            "depthwise",
            nn::conv2d(
                torch::nn::Conv2dOptions(c, c, kernel_size).padding(kernel_size / 2).groups(c)));
        channelwise = register_module("channelwise", nn::ChannelwiseMLP(c + c_skip, c * 4, c));
    }

    // x: [B, C, H, W], skips: [B, c_i, H, W] with sum c_i = c_skip, joined in this order
    // (upstream: the level's skip, then the effnet map) -> [B, C, H, W]
    // bias_folded: see nn::ChannelwiseMLPImpl::add_to (x may then be overwritten).
    torch::Tensor forward(const torch::Tensor& x, const std::vector<torch::Tensor>& skips,
                          bool bias_folded) {
        auto h = normed(x);
        // The skips join along the channels in NHWC order, in one copy, so the MLP's input is
        // contiguous whatever their layouts. (Upstream joins in NCHW, then permutes: a strided
        // input, which costs the first linear layer another copy, and on libtorch 2.x its bias
        // fused into the matrix product, which rounds once instead of twice.)
        if (!skips.empty()) {
            std::vector<torch::Tensor> parts{h};
            for (const auto& skip : skips) parts.push_back(skip.permute({0, 2, 3, 1}));
            h = torch::cat(parts, -1);
        }
        // [B, H, W, C + c_skip] -> MLP -> [B, C, H, W], plus x
        return channelwise->add_to(lora_forward(channelwise->fc1, h), x, bias_folded);
    }

    // The same with the level's effnet mapper folded into the first channelwise layer
    // (effnet_fold, made by fold_effnet_mappers): resized is the image embeddings at this
    // level's size before the mapper, [B, effnet_embd, H, W]; level_skip is the level's skip
    // when the block takes one, else undefined. The layer reads [resized, norm, level skip].
    torch::Tensor forward_folded(const torch::Tensor& x, const torch::Tensor& level_skip,
                                 const torch::Tensor& resized, bool bias_folded) {
        std::vector<torch::Tensor> parts{resized.permute({0, 2, 3, 1}), normed(x)};
        if (level_skip.defined()) parts.push_back(level_skip.permute({0, 2, 3, 1}));
        const auto hidden = effnet_fold.forward(*channelwise->fc1, torch::cat(parts, -1));
        return channelwise->add_to(hidden, x, bias_folded);
    }

    // The depthwise conv and the norm, as [B, H, W, C] (a view: the norm's output is NHWC in
    // memory).
    torch::Tensor normed(const torch::Tensor& x) {
        return nn::layer_norm_2d(depthwise->forward(x)).permute({0, 2, 3, 1});
    }

    int64_t c_skip, c_effnet;
    torch::nn::Conv2d depthwise{nullptr};
    nn::ChannelwiseMLP channelwise{nullptr};
    nn::InputFold effnet_fold;  // channelwise's first layer, reading the level's resized effnet
};
TORCH_MODULE(ResBlockStageB);

// Each ResBlockStageB that reads mapped image embeddings, with the index of its level's effnet
// mapper (down levels, then up levels, as effnet_mapper_list).
std::vector<std::pair<size_t, ResBlockStageBImpl*>> effnet_blocks(
    const torch::nn::ModuleList& down_blocks, const torch::nn::ModuleList& up_blocks) {
    std::vector<std::pair<size_t, ResBlockStageBImpl*>> out;
    size_t index = 0;
    for (const auto& levels : {down_blocks, up_blocks})
        for (const auto& level : *levels) {
            for (const auto& block : *level->as<torch::nn::ModuleListImpl>())
                if (auto* res = block->as<ResBlockStageBImpl>();
                    res != nullptr && res->c_effnet > 0)
                    out.emplace_back(index, res);
            ++index;
        }
    return out;
}

// An effnet mapper (a 1x1 convolution) as the matrix and bias that it applies per position:
// [c_cond, effnet_embd] (a view of the weight) and [c_cond].
std::pair<torch::Tensor, torch::Tensor> mapper_matrix(const torch::nn::Conv2d& mapper) {
    const torch::Tensor& w = mapper->weight;
    return {w.reshape({w.size(0), w.size(1)}), mapper->bias};
}

// Whether every such block has its level's mapper folded in, as the weights are now, for input
// on `device` (and there is one).
bool effnet_folded(const std::vector<std::pair<size_t, ResBlockStageBImpl*>>& blocks,
                   const std::vector<torch::nn::Conv2d>& mappers, const torch::Device& device) {
    for (const auto& [index, res] : blocks) {
        const auto [m, b] = mapper_matrix(mappers.at(index));
        if (!res->effnet_fold.ready(*res->channelwise->fc1, m, b, device)) return false;
    }
    return !blocks.empty();
}

torch::nn::Functional layer_norm_2d_module() {
    return torch::nn::Functional([](torch::Tensor x) { return nn::layer_norm_2d(x, 1e-6); });
}

}  // namespace

WuerstchenDiffNeXtImpl::WuerstchenDiffNeXtImpl(const DiffNeXtConfig& config) : config_(config) {
    config_.validate();
    const auto& c_hidden = config_.c_hidden;
    const size_t levels = c_hidden.size();
    const int64_t c_cond = config_.c_cond;
    const int64_t patch = config_.patch_size;

    clip_mapper = register_module("clip_mapper", nn::linear(config_.clip_embd, c_cond));

    // effnet_mappers is a ModuleList with None entries upstream: register only present indices.
    effnet_mappers = register_module("effnet_mappers", std::make_shared<torch::nn::Module>());
    std::vector<bool> inject = config_.inject_effnet;
    inject.insert(inject.end(), config_.inject_effnet.rbegin(), config_.inject_effnet.rend());
    for (size_t i = 0; i < inject.size(); ++i) {
        torch::nn::Conv2d mapper{nullptr};
        if (inject[i]) {
            mapper = effnet_mappers->register_module(
                std::to_string(i),
                nn::conv2d(torch::nn::Conv2dOptions(config_.effnet_embd, c_cond, 1)));
        }
        effnet_mapper_list.push_back(mapper);
    }

    embedding = register_module(
        "embedding",
        torch::nn::Sequential(
            torch::nn::PixelUnshuffle(torch::nn::PixelUnshuffleOptions(patch)),
            nn::conv2d(torch::nn::Conv2dOptions(config_.c_in * patch * patch, c_hidden[0], 1)),
            layer_norm_2d_module()));

    auto make_block = [&](char type, size_t level,
                          int64_t c_skip) -> std::shared_ptr<torch::nn::Module> {
        const int64_t c = c_hidden[level];
        switch (type) {
            case 'C':
                return ResBlockStageB(c, c_skip, config_.kernel_size,
                                      config_.inject_effnet[level] ? c_cond : 0)
                    .ptr();
            case 'A':
                return nn::AttnBlock(c, c_cond, config_.nhead[level], /*self_attn=*/true).ptr();
            case 'T':
                return nn::TimestepBlock(c, config_.c_r).ptr();
            default:
                throw ConfigError("DiffNeXtConfig: block type '" + std::string(1, type) +
                                  "' not supported");
        }
    };

    down_blocks = register_module("down_blocks", torch::nn::ModuleList());
    for (size_t i = 0; i < levels; ++i) {
        torch::nn::ModuleList level;
        if (i > 0) {
            level->push_back(torch::nn::Sequential(
                layer_norm_2d_module(),
                nn::conv2d(torch::nn::Conv2dOptions(c_hidden[i - 1], c_hidden[i], 2).stride(2))));
        }
        const int64_t c_skip = config_.inject_effnet[i] ? c_cond : 0;
        for (int rep = 0; rep < config_.blocks[i]; ++rep)
            for (char type : config_.level_config[i]) level->push_back(make_block(type, i, c_skip));
        down_blocks->push_back(level);
    }

    up_blocks = register_module("up_blocks", torch::nn::ModuleList());
    for (size_t ri = levels; ri-- > 0;) {
        torch::nn::ModuleList level;
        for (int rep = 0; rep < config_.blocks[ri]; ++rep) {
            const std::string& types = config_.level_config[ri];
            for (size_t k = 0; k < types.size(); ++k) {
                // Only the level's first block (rep == k == 0) takes the skip from the down path.
                int64_t c_skip = (ri + 1 < levels && rep == 0 && k == 0) ? c_hidden[ri] : 0;
                c_skip += config_.inject_effnet[ri] ? c_cond : 0;
                level->push_back(make_block(types[k], ri, c_skip));
            }
        }
        if (ri > 0) {
            level->push_back(torch::nn::Sequential(
                layer_norm_2d_module(),
                nn::CpuSafeConvTranspose2d(c_hidden[ri], c_hidden[ri - 1], /*kernel_size=*/2,
                                           /*stride=*/2)));
        }
        up_blocks->push_back(level);
    }

    clf = register_module(
        "clf",
        torch::nn::Sequential(
            layer_norm_2d_module(),
            nn::conv2d(torch::nn::Conv2dOptions(c_hidden[0], 2 * config_.c_out * patch * patch, 1)),
            torch::nn::PixelShuffle(torch::nn::PixelShuffleOptions(patch))));
}

int64_t WuerstchenDiffNeXtImpl::size_multiple() const {
    return static_cast<int64_t>(config_.patch_size) << (config_.c_hidden.size() - 1);
}

torch::Tensor WuerstchenDiffNeXtImpl::gen_c_embeddings(const torch::Tensor& clip) {
    // [B, L, clip_embd] -> [B, L, c_cond]
    return nn::layer_norm_last(clip_mapper->forward(clip), 1e-6);
}

std::vector<torch::Tensor> DiffNeXtCondition::tensors() const {
    std::vector<torch::Tensor> out;
    if (clip.defined()) out.push_back(clip);
    out.insert(out.end(), kv.begin(), kv.end());
    for (const auto& e : effnet)
        if (e.defined()) out.push_back(e);
    return out;
}

DiffNeXtCondition DiffNeXtCondition::with_tensors(const std::vector<torch::Tensor>& tensors) const {
    if (tensors.size() != this->tensors().size())
        throw InvalidArgument("DiffNeXtCondition::with_tensors: " + std::to_string(tensors.size()) +
                              " tensors for a layout of " + std::to_string(this->tensors().size()));
    DiffNeXtCondition out;
    out.effnet_folded = effnet_folded;
    out.source = source;
    size_t next = 0;
    if (clip.defined()) out.clip = tensors[next++];
    for (size_t i = 0; i < kv.size(); ++i) out.kv.push_back(tensors[next++]);
    for (const auto& e : effnet) out.effnet.push_back(e.defined() ? tensors[next++] : e);
    return out;
}

// What the blocks of one forward read: the call's mapped conditions and this step's r.
struct WuerstchenDiffNeXtImpl::Conditions {
    Conditions(const DiffNeXtCondition& mapped, nn::LinearGroup t_mappers,
               const MappedTimesteps& mapped_t)
        : condition(mapped), t_group(std::move(t_mappers)), t(mapped_t) {}

    const DiffNeXtCondition& condition;
    torch::Tensor r_embed;  // [B, c_r], when t is undefined
    // When defined: every TimestepBlock's modulation (map_timesteps), in execution order, taken
    // in turn, as condition.kv is.
    nn::LinearGroup t_group;
    const MappedTimesteps& t;
    size_t t_next = 0, kv_next = 0;
};

bool WuerstchenDiffNeXtImpl::pack_condition_mappers() {
    return nn::pack_condition_mappers(offload_units());
}

bool WuerstchenDiffNeXtImpl::pack_attention_projections() {
    return nn::pack_attention_projections(offload_units());
}

bool WuerstchenDiffNeXtImpl::fold_effnet_mappers(bool again) {
    const auto blocks = effnet_blocks(down_blocks, up_blocks);
    bool all = !blocks.empty();
    for (const auto& [index, res] : blocks) {
        const auto& mapper = effnet_mapper_list.at(index);
        if (!mapper) return false;
        const auto [m, b] = mapper_matrix(mapper);
        all = res->effnet_fold.fold(*res->channelwise->fc1, m, b, again) && all;
    }
    return all;
}

torch::Tensor WuerstchenDiffNeXtImpl::run_other_block(
    const std::shared_ptr<torch::nn::Module>& block, const torch::Tensor& x, Conditions& k) {
    if (auto* attn = block->as<nn::AttnBlockImpl>()) {
        const DiffNeXtCondition& c = k.condition;
        if (!c.clip.defined())
            throw InvalidArgument("WuerstchenDiffNeXt: clip is required by the attention blocks");
        if (!c.kv.empty()) return attn->forward_mapped(x, c.kv.at(k.kv_next++));
        return attn->forward(x, c.clip);
    }
    if (auto* ts = block->as<nn::TimestepBlockImpl>()) {
        if (k.t.defined()) return ts->modulate_scaled(x, k.t_group.columns(k.t.rows, k.t_next++));
        return ts->forward(x, k.r_embed);
    }
    return block->as<torch::nn::SequentialImpl>()->forward(x);  // level down/up sampler
}

torch::Tensor WuerstchenDiffNeXtImpl::run_res_block(torch::nn::Module& block,
                                                    const torch::Tensor& x,
                                                    const torch::Tensor& level_skip,
                                                    const Conditions& k, size_t mapper_index) {
    auto& res = *block.as<ResBlockStageBImpl>();
    const torch::Tensor& effnet_c = k.condition.effnet[mapper_index];
    if (effnet_c.defined() && k.condition.effnet_folded)
        return res.forward_folded(x, level_skip, effnet_c, k.t.residual_biases_folded);
    std::vector<torch::Tensor> skips;
    if (level_skip.defined()) skips.push_back(level_skip);
    if (effnet_c.defined()) skips.push_back(effnet_c);
    return res.forward(x, skips, k.t.residual_biases_folded);
}

std::vector<torch::Tensor> WuerstchenDiffNeXtImpl::down_encode(torch::Tensor x, Conditions& k) {
    std::vector<torch::Tensor> level_outputs;  // deepest level first
    for (size_t i = 0; i < down_blocks->size(); ++i) {
        auto level = down_blocks[i]->as<torch::nn::ModuleListImpl>();
        for (const auto& block : *level) {
            if (auto* res = block->as<ResBlockStageBImpl>()) {
                x = run_unit(block_hook, *res, [&] { return run_res_block(*res, x, {}, k, i); });
            } else {
                x = run_unit(block_hook, *block, [&] { return run_other_block(block, x, k); });
            }
        }
        level_outputs.insert(level_outputs.begin(), x);
    }
    return level_outputs;
}

torch::Tensor WuerstchenDiffNeXtImpl::up_decode(const std::vector<torch::Tensor>& level_outputs,
                                                Conditions& k) {
    torch::Tensor x = level_outputs[0];
    const size_t n_down = down_blocks->size();
    for (size_t i = 0; i < up_blocks->size(); ++i) {
        auto level = up_blocks[i]->as<torch::nn::ModuleListImpl>();
        for (size_t j = 0; j < level->size(); ++j) {
            const auto& block = level->ptr(j);
            if (auto* res = block->as<ResBlockStageBImpl>()) {
                const torch::Tensor level_skip =
                    j == 0 && i > 0 ? level_outputs[i] : torch::Tensor();
                x = run_unit(block_hook, *res,
                             [&] { return run_res_block(*res, x, level_skip, k, n_down + i); });
            } else {
                x = run_unit(block_hook, *block, [&] { return run_other_block(block, x, k); });
            }
        }
    }
    return x;
}

std::pair<int64_t, int64_t> WuerstchenDiffNeXtImpl::mapper_level_size(size_t index, int64_t height,
                                                                      int64_t width) const {
    // Down level `index`, or up level `index - n_down` (deepest first): patch_size, then halved
    // per level below the first.
    const size_t n_down = down_blocks->size();
    const size_t level = index < n_down ? index : 2 * n_down - 1 - index;
    const int64_t patch = config_.patch_size;
    return {height / patch >> level, width / patch >> level};
}

void WuerstchenDiffNeXtImpl::check_input(const torch::Tensor& x, const torch::Tensor& r) const {
    check_latents(x);
    nn::check_ratios("WuerstchenDiffNeXt", r, x.scalar_type(), x.size(0));
}

void WuerstchenDiffNeXtImpl::check_latents(const torch::Tensor& x) const {
    nn::check_nchw("WuerstchenDiffNeXt", "x", x, config_.c_in, module_dtype(*this));
    const int64_t m = size_multiple();
    if (x.size(2) % m != 0 || x.size(3) % m != 0)
        throw InvalidArgument(
            "WuerstchenDiffNeXt: the height and width of x must be divisible by " +
            std::to_string(m) + ", got " + c10::str(x.sizes()));
    if (config_.c_out != config_.c_in)
        throw InvalidArgument("WuerstchenDiffNeXt: returning noise needs c_out == c_in");
}

namespace {

// The modules that map_condition ran for `condition`: clip_mapper (with text states), the
// kv_mappers (when packed), and each effnet mapper (unless folded into the blocks).
nn::NamedModules condition_mappers(const WuerstchenDiffNeXtImpl& decoder,
                                   const DiffNeXtCondition& condition) {
    nn::NamedModules out;
    if (condition.clip.defined()) out.emplace_back("clip_mapper", decoder.clip_mapper.ptr().get());
    if (!condition.kv.empty()) nn::add_kv_mappers(decoder.offload_units(), out);
    if (!condition.effnet_folded)
        for (size_t i = 0; i < decoder.effnet_mapper_list.size(); ++i)
            if (decoder.effnet_mapper_list[i])
                out.emplace_back("effnet_mappers." + std::to_string(i),
                                 decoder.effnet_mapper_list[i].ptr().get());
    return out;
}

// check_condition for a forward on `device`: a condition mapped for the effnet mappers folded
// into the residual blocks needs that fold to hold there still (the blocks apply the mappers from
// it), and the modules that mapped it must be as they were.
void check_condition_on(const WuerstchenDiffNeXtImpl& decoder, const DiffNeXtCondition& condition,
                        const torch::Device& device) {
    if (condition.effnet_folded &&
        !effnet_folded(effnet_blocks(decoder.down_blocks, decoder.up_blocks),
                       decoder.effnet_mapper_list, device))
        throw InvalidArgument(
            "WuerstchenDiffNeXt: the condition was mapped for the effnet mappers folded into the "
            "residual blocks (fold_effnet_mappers), and those weights have been replaced or "
            "changed since (or are not on " +
            device.str() + "); map it again");
    nn::check_condition_source(condition.kv, condition.source.get(),
                               condition_mappers(decoder, condition), decoder.offload_units(),
                               "WuerstchenDiffNeXt");
}

}  // namespace

DiffNeXtCondition WuerstchenDiffNeXtImpl::map_condition(const torch::Tensor& effnet,
                                                        const torch::Tensor& clip, int64_t height,
                                                        int64_t width, bool project_kv) {
    const int64_t m = size_multiple();
    if (height <= 0 || width <= 0 || height % m != 0 || width % m != 0)
        throw InvalidArgument(
            "WuerstchenDiffNeXt: the latents' height and width must be "
            "positive and divisible by " +
            std::to_string(m) + ", got " + std::to_string(height) + "x" + std::to_string(width));
    // Both in the model's dtype: upstream maps effnet in its own dtype, clip through Linears.
    const torch::ScalarType dtype = module_dtype(*this);
    if (!effnet.defined() || effnet.dim() != 4 || effnet.size(1) != config_.effnet_embd ||
        effnet.size(2) < 1 || effnet.size(3) < 1 || effnet.scalar_type() != dtype)
        throw InvalidArgument("WuerstchenDiffNeXt: effnet must be [B, " +
                              std::to_string(config_.effnet_embd) + ", h, w] in the model's " +
                              c10::toString(dtype) + ", got " + nn::describe(effnet));
    if (clip.defined() && (clip.dim() != 3 || clip.size(0) != effnet.size(0) ||
                           clip.size(2) != config_.clip_embd || clip.scalar_type() != dtype))
        throw InvalidArgument("WuerstchenDiffNeXt: clip must be [" +
                              std::to_string(effnet.size(0)) + ", L, " +
                              std::to_string(config_.clip_embd) + "] (effnet's batch), got " +
                              c10::str(clip.sizes()));
    DiffNeXtCondition c;
    std::vector<std::vector<nn::TensorSeen>> projected;
    if (clip.defined()) {
        c.clip = gen_c_embeddings(clip);
        nn::MappedKv mapped = nn::map_kv_packed(offload_units(), c.clip, project_kv);
        c.kv = std::move(mapped.kv);
        projected = std::move(mapped.projected);
    }
    c.effnet_folded =
        effnet_folded(effnet_blocks(down_blocks, up_blocks), effnet_mapper_list, effnet.device());
    // Upstream, per level: interpolate(effnet.float(), size=x.shape[-2:], mode="bicubic",
    // antialias=True, align_corners=True).to(dtype), then the level's 1x1 conv:
    // [B, effnet_embd, h, w] -> [B, c_cond, H_level, W_level]. A down level and its up level
    // share the size, so each size is resized once.
    std::map<std::pair<int64_t, int64_t>, torch::Tensor> resized;
    for (size_t index = 0; index < effnet_mapper_list.size(); ++index) {
        auto& mapper = effnet_mapper_list[index];
        if (!mapper) {
            c.effnet.emplace_back();
            continue;
        }
        const auto size = mapper_level_size(index, height, width);
        torch::Tensor& r = resized[size];
        if (!r.defined())
            r = at::_upsample_bicubic2d_aa(effnet.to(torch::kFloat32), {size.first, size.second},
                                           /*align_corners=*/true)
                    .to(effnet.scalar_type());
        // Folded, the level's blocks read r itself (NHWC in memory, as they join it).
        c.effnet.push_back(c.effnet_folded ? r.contiguous(at::MemoryFormat::ChannelsLast)
                                           : mapper->forward(r));
    }
    c.source = nn::note_condition_source(condition_mappers(*this, c), std::move(projected));
    return c;
}

void WuerstchenDiffNeXtImpl::check_condition(const DiffNeXtCondition& condition) const {
    for (const auto& e : condition.effnet)
        if (e.defined()) return check_condition_on(*this, condition, e.device());
    check_condition_on(*this, condition, torch::kCPU);  // no embeddings: nothing folded to check
}

torch::Tensor WuerstchenDiffNeXtImpl::forward(const torch::Tensor& x, const torch::Tensor& r,
                                              const torch::Tensor& effnet,
                                              const torch::Tensor& clip) {
    check_input(x, r);
    if (!effnet.defined() || effnet.dim() != 4 || effnet.size(0) != x.size(0) ||
        effnet.size(1) != config_.effnet_embd)
        throw InvalidArgument(
            "WuerstchenDiffNeXt: effnet must be [" + std::to_string(x.size(0)) + ", " +
            std::to_string(config_.effnet_embd) + ", h, w], got " +
            (effnet.defined() ? c10::str(effnet.sizes()) : std::string("undefined")));
    return forward(x, r, map_condition(effnet, clip, x.size(2), x.size(3)));
}

MappedTimesteps WuerstchenDiffNeXtImpl::map_timesteps(const torch::Tensor& r) {
    nn::check_ratios("WuerstchenDiffNeXt::map_timesteps", r, module_dtype(*this), /*batch=*/-1);
    return nn::map_timesteps_ahead(offload_units(), nn::r_embedding(r, config_.c_r));
}

torch::Tensor WuerstchenDiffNeXtImpl::forward(const torch::Tensor& x, const torch::Tensor& r,
                                              const DiffNeXtCondition& condition) {
    check_input(x, r);
    // Every timestep block's mapping of r's embedding in one product when packed, with the
    // residual blocks' last biases moved into it (each residual block then sums its product
    // into its input); else each block maps its own.
    const auto r_embed = nn::r_embedding(r, config_.c_r);
    const auto blocks = offload_units();
    const MappedTimesteps t =
        nn::map_timesteps_packed(nn::timestep_mappers(blocks), blocks, r_embed);
    return forward_blocks(x, t, t.defined() ? torch::Tensor() : r_embed, condition);
}

torch::Tensor WuerstchenDiffNeXtImpl::forward(const torch::Tensor& x, const MappedTimesteps& t,
                                              const DiffNeXtCondition& condition) {
    check_latents(x);
    nn::check_mapped_timesteps(t, offload_units(), x.size(0), x.device(), x.scalar_type(),
                               "WuerstchenDiffNeXt");
    return forward_blocks(x, t, {}, condition);
}

torch::Tensor WuerstchenDiffNeXtImpl::forward_blocks(const torch::Tensor& x,
                                                     const MappedTimesteps& t,
                                                     const torch::Tensor& r_embed,
                                                     const DiffNeXtCondition& condition) {
    // The condition must be map_condition's for this batch and these latents' size.
    const auto blocks = offload_units();  // every block, in execution order
    const size_t attention = nn::kv_mappers(blocks).size();
    bool fits = condition.effnet.size() == effnet_mapper_list.size() &&
                (condition.kv.empty() || condition.kv.size() == attention) &&
                (!condition.clip.defined() || condition.clip.size(0) == x.size(0));
    const int64_t effnet_channels = condition.effnet_folded ? config_.effnet_embd : config_.c_cond;
    for (size_t index = 0; fits && index < effnet_mapper_list.size(); ++index) {
        const torch::Tensor& e = condition.effnet[index];
        const auto size = mapper_level_size(index, x.size(2), x.size(3));
        fits = e.defined() == static_cast<bool>(effnet_mapper_list[index]) &&
               (!e.defined() ||
                (e.dim() == 4 && e.size(0) == x.size(0) && e.size(1) == effnet_channels &&
                 e.size(2) == size.first && e.size(3) == size.second));
    }
    if (!fits)
        throw InvalidArgument("WuerstchenDiffNeXt: the condition must be map_condition's for x " +
                              c10::str(x.sizes()));
    check_condition_on(*this, condition, x.device());
    Conditions k(condition, nn::timestep_mappers(blocks), t);
    k.r_embed = r_embed;

    auto h = embedding->forward(x);  // [B, c_hidden[0], H/p, W/p]
    const auto level_outputs = down_encode(h, k);
    h = up_decode(level_outputs, k);
    auto ab = clf->forward(h).chunk(2, 1);  // a, b: [B, c_out, H, W]
    auto b = ab[1].sigmoid() * (1 - kOutputEps * 2) + kOutputEps;
    // contiguous(): NCHW order also when the weights are channels-last (a no-op otherwise).
    return ((x - ab[0]) / b).contiguous();
}

std::vector<torch::nn::Module*> WuerstchenDiffNeXtImpl::offload_units() const {
    std::vector<torch::nn::Module*> units;
    for (const auto& levels : {down_blocks, up_blocks})
        for (const auto& level : *levels)
            for (const auto& block : *level->as<torch::nn::ModuleListImpl>())
                units.push_back(block.get());
    return units;
}

WuerstchenDiffNeXt load_diffnext(const std::string& dir, const LoadOptions& options) {
    const auto config = DiffNeXtConfig::from_file(dir + "/config.json");
    auto model = build_unwritten<WuerstchenDiffNeXt>(config);
    load_weights(*model, find_weight_files(dir, "diffusion_pytorch_model"), options);
    prepare_module(*model, options);
    if (!options.offload && !options.sequential_offload) {
        model->pack_condition_mappers();
        model->pack_attention_projections();
        model->fold_effnet_mappers();
    }
    return model;
}

}  // namespace wuerstchen
