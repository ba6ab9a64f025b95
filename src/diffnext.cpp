#include "wuerstchen/diffnext.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/container/functional.h>
#include <torch/nn/modules/pixelshuffle.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "nn/blocks.h"
#include "nn/init.h"
#include "wuerstchen/error.h"

namespace wuerstchen {

namespace {

constexpr double kOutputEps = 1e-3;  // forward(eps=1e-3) upstream

// Stage B's residual block (ResBlockStageB upstream): the depthwise conv sees x only, the skip
// joins after the norm, in front of the channelwise MLP.
struct ResBlockStageBImpl : torch::nn::Module {
    ResBlockStageBImpl(int64_t c, int64_t c_skip_, int64_t kernel_size) : c_skip(c_skip_) {
        depthwise = register_module(
            "depthwise",
            nn::conv2d(
                torch::nn::Conv2dOptions(c, c, kernel_size).padding(kernel_size / 2).groups(c)));
        channelwise = register_module("channelwise", nn::ChannelwiseMLP(c + c_skip, c * 4, c));
    }

    // x: [B, C, H, W], skips: [B, c_i, H, W] with sum c_i = c_skip, joined in this order
    // (upstream: the level's skip, then the effnet map) -> [B, C, H, W]
    torch::Tensor forward(const torch::Tensor& x, const std::vector<torch::Tensor>& skips) {
        // The norm's output is NHWC in memory: [B, H, W, C] is a view.
        auto h = nn::layer_norm_2d(depthwise->forward(x)).permute({0, 2, 3, 1});
        // The skips join along the channels in NHWC order, in one copy, so the MLP's input is
        // contiguous whatever their layouts. (Upstream joins in NCHW, then permutes: a strided
        // input, which costs the first linear layer another copy, and on libtorch 2.x its bias
        // fused into the matrix product, which rounds once instead of twice.)
        if (!skips.empty()) {
            std::vector<torch::Tensor> parts{h};
            for (const auto& skip : skips) parts.push_back(skip.permute({0, 2, 3, 1}));
            h = torch::cat(parts, -1);
        }
        // [B, H, W, C + c_skip] -> MLP -> [B, C, H, W]
        h = channelwise->forward(h).permute({0, 3, 1, 2});
        return h + x;
    }

    int64_t c_skip;
    torch::nn::Conv2d depthwise{nullptr};
    nn::ChannelwiseMLP channelwise{nullptr};
};
TORCH_MODULE(ResBlockStageB);

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
                return ResBlockStageB(c, c_skip, config_.kernel_size).ptr();
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

struct WuerstchenDiffNeXtImpl::Conditions {
    Conditions(nn::LinearGroup t_mappers, nn::LinearGroup kv_mappers)
        : t_group(std::move(t_mappers)), kv_group(std::move(kv_mappers)) {}

    torch::Tensor r_embed;  // [B, c_r]
    torch::Tensor clip;     // gen_c_embeddings: [B, L, c_cond], or undefined
    torch::Tensor effnet;   // [B, effnet_embd, h, w]
    // The effnet embedding resized to each level's size (a down level and its up level share it).
    std::map<std::pair<int64_t, int64_t>, torch::Tensor> resized;
    // When packed: every TimestepBlock's mapping of r_embed ([B, sum of 2C], 1 added to each
    // scale by add_one_to_scales) and every AttnBlock's kv_mapper of clip (one [B, L, C] each,
    // contiguous by kv_group.split, for the attention's join) in execution order, taken in turn.
    nn::LinearGroup t_group, kv_group;
    torch::Tensor t_all;
    std::vector<torch::Tensor> kv_all;
    size_t t_next = 0, kv_next = 0;
};

bool WuerstchenDiffNeXtImpl::pack_condition_mappers() {
    return nn::pack_condition_mappers(offload_units());
}

bool WuerstchenDiffNeXtImpl::pack_attention_projections() {
    return nn::pack_attention_projections(offload_units());
}

torch::Tensor WuerstchenDiffNeXtImpl::map_effnet(size_t index, Conditions& k,
                                                 const torch::Tensor& x) {
    // Upstream: interpolate(effnet.float(), size=x.shape[-2:], mode="bicubic", antialias=True,
    // align_corners=True).to(dtype), then the level's 1x1 conv: [B, effnet_embd, h, w] ->
    // [B, c_cond, H_level, W_level].
    torch::Tensor& resized = k.resized[{x.size(2), x.size(3)}];
    if (!resized.defined())
        resized = at::_upsample_bicubic2d_aa(k.effnet.to(torch::kFloat32), {x.size(2), x.size(3)},
                                             /*align_corners=*/true)
                      .to(k.effnet.scalar_type());
    return effnet_mapper_list[index]->forward(resized);
}

torch::Tensor WuerstchenDiffNeXtImpl::run_other_block(
    const std::shared_ptr<torch::nn::Module>& block, const torch::Tensor& x, Conditions& k) {
    if (auto* attn = block->as<nn::AttnBlockImpl>()) {
        if (!k.clip.defined())
            throw InvalidArgument("WuerstchenDiffNeXt: clip is required by the attention blocks");
        if (!k.kv_all.empty()) return attn->forward_mapped(x, k.kv_all.at(k.kv_next++));
        return attn->forward(x, k.clip);
    }
    if (auto* ts = block->as<nn::TimestepBlockImpl>()) {
        if (k.t_all.defined())
            return ts->modulate_scaled(x, k.t_group.columns(k.t_all, k.t_next++));
        return ts->forward(x, k.r_embed);
    }
    return block->as<torch::nn::SequentialImpl>()->forward(x);  // level down/up sampler
}

std::vector<torch::Tensor> WuerstchenDiffNeXtImpl::down_encode(torch::Tensor x, Conditions& k) {
    std::vector<torch::Tensor> level_outputs;  // deepest level first
    for (size_t i = 0; i < down_blocks->size(); ++i) {
        auto level = down_blocks[i]->as<torch::nn::ModuleListImpl>();
        const bool inject = static_cast<bool>(effnet_mapper_list[i]);
        torch::Tensor effnet_c;
        for (const auto& block : *level) {
            if (auto* res = block->as<ResBlockStageBImpl>()) {
                if (inject && !effnet_c.defined()) effnet_c = map_effnet(i, k, x);
                std::vector<torch::Tensor> skips;
                if (effnet_c.defined()) skips.push_back(effnet_c);
                x = run_unit(block_hook, *res, [&] { return res->forward(x, skips); });
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
        const size_t mapper_index = n_down + i;
        const bool inject = static_cast<bool>(effnet_mapper_list[mapper_index]);
        torch::Tensor effnet_c;
        for (size_t j = 0; j < level->size(); ++j) {
            const auto& block = level->ptr(j);
            if (auto* res = block->as<ResBlockStageBImpl>()) {
                if (inject && !effnet_c.defined()) effnet_c = map_effnet(mapper_index, k, x);
                std::vector<torch::Tensor> skips;
                if (j == 0 && i > 0) skips.push_back(level_outputs[i]);
                if (effnet_c.defined()) skips.push_back(effnet_c);
                x = run_unit(block_hook, *res, [&] { return res->forward(x, skips); });
            } else {
                x = run_unit(block_hook, *block, [&] { return run_other_block(block, x, k); });
            }
        }
    }
    return x;
}

torch::Tensor WuerstchenDiffNeXtImpl::forward(const torch::Tensor& x, const torch::Tensor& r,
                                              const torch::Tensor& effnet,
                                              const torch::Tensor& clip) {
    if (x.dim() != 4 || x.size(1) != config_.c_in)
        throw InvalidArgument("WuerstchenDiffNeXt: x must be [B, " + std::to_string(config_.c_in) +
                              ", H, W], got " + c10::str(x.sizes()));
    const int64_t m = size_multiple();
    if (x.size(2) % m != 0 || x.size(3) % m != 0)
        throw InvalidArgument(
            "WuerstchenDiffNeXt: the height and width of x must be divisible by " +
            std::to_string(m) + ", got " + c10::str(x.sizes()));
    if (r.dim() != 1 || r.size(0) != x.size(0))
        throw InvalidArgument("WuerstchenDiffNeXt: r must be [B] with B = " +
                              std::to_string(x.size(0)) + ", got " + c10::str(r.sizes()));
    if (effnet.dim() != 4 || effnet.size(0) != x.size(0) || effnet.size(1) != config_.effnet_embd)
        throw InvalidArgument("WuerstchenDiffNeXt: effnet must be [" + std::to_string(x.size(0)) +
                              ", " + std::to_string(config_.effnet_embd) + ", h, w], got " +
                              c10::str(effnet.sizes()));
    if (config_.c_out != config_.c_in)
        throw InvalidArgument("WuerstchenDiffNeXt: returning noise needs c_out == c_in");

    const auto blocks = offload_units();  // every block, in execution order
    Conditions k(nn::timestep_mappers(blocks), nn::kv_mappers(blocks));
    k.r_embed = nn::r_embedding(r, config_.c_r);
    k.clip = clip.defined() ? gen_c_embeddings(clip) : clip;
    k.effnet = effnet;
    // Every block's mapping of r_embed and of the condition in one product each, when packed
    // (kv_mapper is SiLU then Linear); else each block maps its own.
    if (k.t_group.ready(k.r_embed.device())) {
        k.t_all = k.t_group.forward(k.r_embed);
        nn::add_one_to_scales(k.t_group, k.t_all);
    }
    if (k.clip.defined() && k.kv_group.ready(k.clip.device()))
        k.kv_all = k.kv_group.split(k.kv_group.forward(at::silu(k.clip)));

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
    }
    return model;
}

}  // namespace wuerstchen
