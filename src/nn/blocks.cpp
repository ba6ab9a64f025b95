#include "nn/blocks.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/nn/modules/activation.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "nn/init.h"
#include "wuerstchen/error.h"

namespace wuerstchen::nn {

namespace {

bool is_reduced_float(const torch::Tensor& x) {
    return x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16;
}

// Half / bfloat16 on the CPU: the ops below that libtorch 1.13 lacks (or gets wrong) there in
// reduced precision run in float32 and round back.
bool widened_on_cpu(const torch::Tensor& x) { return x.is_cpu() && is_reduced_float(x); }

}  // namespace

torch::Tensor layer_norm_last(const torch::Tensor& x, double eps) {
    const int64_t c = x.size(-1);
    // CUDA's layer norm accumulates half / bfloat16 input in float32 (as upstream's nn.LayerNorm
    // does there); on the CPU the input is widened first, which costs two passes over x.
    if (widened_on_cpu(x)) {
        return at::layer_norm(x.to(torch::kFloat32), {c}, {}, {}, eps).to(x.scalar_type());
    }
    return at::layer_norm(x, {c}, {}, {}, eps);
}

torch::Tensor layer_norm_2d(const torch::Tensor& x, double eps) {
    // WuerstchenLayerNorm: permute to NHWC, normalise over C, permute back.
    return layer_norm_last(x.permute({0, 2, 3, 1}), eps).permute({0, 3, 1, 2});
}

int64_t balanced_part(int64_t total, int64_t max_part) {
    if (total <= 0) return 0;
    const int64_t most = std::clamp<int64_t>(max_part, 1, total);
    const int64_t parts = (total + most - 1) / most;
    return (total + parts - 1) / parts;
}

torch::Tensor gelu(const torch::Tensor& x) { return at::gelu(x); }

torch::Tensor replication_pad_2d(const torch::Tensor& x, int64_t pad) {
    if (widened_on_cpu(x))
        return at::replication_pad2d(x.to(torch::kFloat32), {pad, pad, pad, pad})
            .to(x.scalar_type());
    return at::replication_pad2d(x, {pad, pad, pad, pad});
}

// ---------------------------------------------------------------------------- TimestepBlock

TimestepBlockImpl::TimestepBlockImpl(int64_t c, int64_t c_timestep) {
    mapper = register_module("mapper", make_lora_linear(c_timestep, c * 2));
}

torch::Tensor TimestepBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& t) {
    return modulate(x, lora_forward(mapper, t));  // t: [B, c_r] -> [B, 2C]
}

torch::Tensor TimestepBlockImpl::modulate(const torch::Tensor& x, const torch::Tensor& mapped) {
    // [B, 2C] -> [B, 2C, 1, 1] -> a, b: [B, C, 1, 1]
    auto ab = mapped.unsqueeze(-1).unsqueeze(-1).chunk(2, 1);
    // b + x * (1 + a) in one pass over x (upstream: a multiply, then an add).
    return at::addcmul(ab[1], x, 1 + ab[0]);
}

torch::Tensor TimestepBlockImpl::modulate_scaled(const torch::Tensor& x,
                                                 const torch::Tensor& factors) {
    auto ab = factors.unsqueeze(-1).unsqueeze(-1).chunk(2, 1);  // 1 + a, b: [B, C, 1, 1]
    return at::addcmul(ab[1], x, ab[0]);
}

// ---------------------------------------------------------------------------- GlobalResponseNorm

GlobalResponseNormImpl::GlobalResponseNormImpl(int64_t dim) {
    gamma = register_parameter("gamma", torch::zeros({1, 1, 1, dim}));
    beta = register_parameter("beta", torch::zeros({1, 1, 1, dim}));
}

torch::Tensor GlobalResponseNormImpl::forward(const torch::Tensor& x) {
    if (widened_on_cpu(x)) {
        // Half / bfloat16 on the CPU (not a speed path): upstream's terms in x's dtype, two
        // passes, the small term in its own precision: (x + beta) + x * (gamma * Nx).
        const auto agg = at::norm(x, 2, {1, 2}, /*keepdim=*/true);
        const auto stand_div_norm = agg / (agg.mean({-1}, /*keepdim=*/true) + 1e-6);
        return at::addcmul(x + beta, x, gamma * stand_div_norm);
    }
    // The L2 norm over the spatial dims (H, W) per channel, [B, 1, 1, C], in float32 (CUDA
    // reduces half / bfloat16 input to a float32 output in one pass), and d = its mean over the
    // channels + 1e-6.
    // (float64 input stays float64: libtorch 2.x refuses a narrowing reduction dtype.)
    const auto agg = at::norm(x, 2, {1, 2}, /*keepdim=*/true,
                              at::promote_types(x.scalar_type(), torch::kFloat32));
    const auto d = agg.mean({-1}, /*keepdim=*/true).add_(1e-6);
    // Upstream: gamma * (x * Nx) + beta + x with Nx = agg / d, four passes over x. Here the same
    // sum as beta + x * f with f = 1 + gamma * Nx = (d + gamma * agg) / d: two small float32 ops
    // (no overflow), rounded once to x's dtype, then one pass over x. In half precision that
    // rounding of f (relative error up to 2^-11; 2^-8 in bfloat16) is as large as the output's
    // own; a float32 f would keep it exact, but a mixed-dtype pass over x ran no faster on an
    // H100 than the two passes it replaced.
    const auto sum = at::addcmul(d, gamma, agg);
    const bool records_autograd =
        at::GradMode::is_enabled() &&
        (x.requires_grad() || gamma.requires_grad() || beta.requires_grad());
    torch::Tensor f;
    if (records_autograd) {
        f = (sum / d).to(x.scalar_type());  // out= forms do not record
    } else {
        f = at::empty(agg.sizes(), x.options());
        at::div_out(f, sum, d);  // rounded to x's dtype in the same op
    }
    return at::addcmul(beta, x, f);
}

// ---------------------------------------------------------------------------- ChannelwiseMLP

ChannelwiseMLPImpl::ChannelwiseMLPImpl(int64_t c_in, int64_t c_hidden, int64_t c_out) {
    // Upstream Sequential indices: 0 Linear, 1 GELU, 2 GRN, 3 Dropout, 4 Linear.
    fc1 = register_module("0", make_lora_linear(c_in, c_hidden));
    grn = register_module("2", GlobalResponseNorm(c_hidden));
    fc2 = register_module("4", make_lora_linear(c_hidden, c_out));
}

torch::Tensor ChannelwiseMLPImpl::forward(const torch::Tensor& x) {
    return forward_hidden(lora_forward(fc1, x));
}

torch::Tensor ChannelwiseMLPImpl::forward_hidden(const torch::Tensor& hidden) {
    return lora_forward(fc2, grn->forward(nn::gelu(hidden)));
}

torch::Tensor ChannelwiseMLPImpl::add_to(const torch::Tensor& hidden, const torch::Tensor& x,
                                         bool bias_folded) {
    if (!bias_folded) return forward_hidden(hidden).permute({0, 3, 1, 2}) + x;
    const auto h = grn->forward(nn::gelu(hidden));  // [B, H, W, 4C]
    const auto weight_t = fc2->weight.t();
    const auto x_nhwc = x.permute({0, 2, 3, 1});
    if (x_nhwc.is_contiguous() && !at::GradMode::is_enabled()) {
        // x as the [B*H*W, C] matrix the product accumulates into (beta = 1).
        x_nhwc.view({-1, x.size(1)}).addmm_(h.reshape({-1, h.size(-1)}), weight_t);
        return x;
    }
    return at::matmul(h, weight_t).permute({0, 3, 1, 2}) + x;
}

// ---------------------------------------------------------------------------- ResBlock

ResBlockImpl::ResBlockImpl(int64_t c, int64_t c_skip, int64_t kernel_size) {
    depthwise =
        register_module("depthwise", conv2d(torch::nn::Conv2dOptions(c + c_skip, c, kernel_size)
                                                .padding(kernel_size / 2)
                                                .groups(c)));
    channelwise = register_module("channelwise", ChannelwiseMLP(c, c * 4, c));
}

torch::Tensor ResBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& x_skip,
                                    bool bias_folded) {
    auto h = x_skip.defined() ? torch::cat({x, x_skip}, 1) : x;
    // [B, C, H, W] -> [B, H, W, C] for the channelwise MLP, and back; plus the residual x.
    h = layer_norm_2d(depthwise->forward(h)).permute({0, 2, 3, 1});
    return channelwise->add_to(lora_forward(channelwise->fc1, h), x, bias_folded);
}

// ---------------------------------------------------------------------------- Attention

AttentionImpl::AttentionImpl(int64_t query_dim, int64_t heads_, int64_t dim_head_)
    : heads(heads_), dim_head(dim_head_) {
    const int64_t inner = heads * dim_head;
    to_q = register_module("to_q", make_lora_linear(query_dim, inner));
    to_k = register_module("to_k", make_lora_linear(query_dim, inner));
    to_v = register_module("to_v", make_lora_linear(query_dim, inner));
    // to_out.1 is a Dropout upstream: no parameters, identity at inference.
    to_out = register_module("to_out", torch::nn::Sequential(LoraLinear(inner, query_dim)));
}

LinearGroup AttentionImpl::projections() const {
    return LinearGroup({to_q.ptr().get(), to_k.ptr().get(), to_v.ptr().get()});
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
    const int64_t b = x.size(0);
    const int64_t n = x.size(1);
    const int64_t m = context.size(1);
    // [B, N, heads*dim_head] -> [B, heads, N, dim_head]
    auto q = lora_forward(to_q, x).view({b, n, heads, dim_head}).transpose(1, 2);
    auto k = lora_forward(to_k, context).view({b, m, heads, dim_head}).transpose(1, 2);
    auto v = lora_forward(to_v, context).view({b, m, heads, dim_head}).transpose(1, 2);
    return attend(q, k, v);
}

torch::Tensor AttentionImpl::forward_self(const torch::Tensor& x, const torch::Tensor& context) {
    const LinearGroup group = projections();
    if (!group.ready(context.device())) return forward(x, context);
    const int64_t b = x.size(0);
    const int64_t n = x.size(1);
    const int64_t m = context.size(1);
    // [B, M, C] -> [B, M, 3 * heads*dim_head]; each projection is a column view of it, q also
    // only its first N rows (the rows of x). Views: the attention reads strided heads anyway.
    const auto qkv = group.forward(context);
    auto q = group.columns(qkv, 0).narrow(1, 0, n).view({b, n, heads, dim_head}).transpose(1, 2);
    auto k = group.columns(qkv, 1).view({b, m, heads, dim_head}).transpose(1, 2);
    auto v = group.columns(qkv, 2).view({b, m, heads, dim_head}).transpose(1, 2);
    return attend(q, k, v);
}

torch::Tensor AttentionImpl::project_kv(const torch::Tensor& context) const {
    const LinearGroup group = projections();
    if (!group.ready(context.device())) return {};
    // The packed product's k and v columns sit side by side: [B, M, 2 * heads*dim_head].
    const int64_t inner = heads * dim_head;
    return group.forward(context).narrow(-1, inner, 2 * inner).contiguous();
}

torch::Tensor AttentionImpl::forward_self_projected(const torch::Tensor& x,
                                                    const torch::Tensor& kv_more) {
    const LinearGroup group = projections();
    if (!group.ready(x.device()))
        throw InvalidArgument(
            "Attention: the condition carries keys and values projected ahead (map_condition's "
            "project_kv), and the projections cannot run packed now (a LoRA adapter on them "
            "contributing, autograd on, or moved): map the condition again");
    const int64_t b = x.size(0);
    const int64_t n = x.size(1);
    const int64_t m = n + kv_more.size(1);
    const int64_t inner = heads * dim_head;
    const auto qkv = group.forward(x);  // [B, N, 3 * inner]
    // Keys and values in the order of [x ; more], as forward_self has them.
    const auto kv = torch::cat({qkv.narrow(-1, inner, 2 * inner), kv_more}, 1);  // [B, M, 2 inner]
    auto q = group.columns(qkv, 0).view({b, n, heads, dim_head}).transpose(1, 2);
    auto k = kv.narrow(-1, 0, inner).view({b, m, heads, dim_head}).transpose(1, 2);
    auto v = kv.narrow(-1, inner, inner).view({b, m, heads, dim_head}).transpose(1, 2);
    return attend(q, k, v);
}

torch::Tensor AttentionImpl::attend(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v) {
    const int64_t b = q.size(0);
    const int64_t n = q.size(2);
    // AttnProcessor: softmax(q k^T * dim_head^-0.5) v, softmax in the input dtype.
#if TORCH_VERSION_MAJOR >= 2
    auto out = at::scaled_dot_product_attention(q, k, v);  // default scale = dim_head^-0.5
#else
    // libtorch 1.13 has no fused attention: the scores [B, heads, N, M] are materialised, so the
    // queries go in chunks of about kScoreBytes of scores (the decoder's first attention level at
    // 1024x1024 has 4096 queries: 0.7 GB of float32 scores at once). Every row is computed as
    // on the whole matrix.
    constexpr int64_t kScoreBytes = int64_t{64} << 20;
    const int64_t m = k.size(2);
    const double scale = 1.0 / std::sqrt(static_cast<double>(dim_head));
    const auto kt = k.transpose(-1, -2);
    const int64_t row_bytes = b * heads * m * static_cast<int64_t>(q.element_size());
    // Multiplying by a power of two is exact, so such a scale (dim_head 64 in every real model)
    // gives the same scores bit for bit when it multiplies the queries instead: a pass over
    // N x dim_head values instead of N x M. Not in float16, whose small queries would become
    // subnormal (float32 and bfloat16 have the exponent range).
    int exponent = 0;
    const bool exact_scale = std::frexp(scale, &exponent) == 0.5 && q.scalar_type() != torch::kHalf;
    auto attend_rows = [&](const torch::Tensor& queries) {
        auto scores =
            exact_scale ? at::matmul(queries * scale, kt) : at::matmul(queries, kt) * scale;
        // The softmax in place, where autograd allows it: no second score matrix.
        if (scores.requires_grad())
            scores = at::softmax(scores, -1);
        else
            at::_softmax_out(scores, scores, -1, /*half_to_float=*/false);
        return at::matmul(scores, v);
    };
    // Equal chunks, as few as the budget allows; empty shapes in one go.
    const int64_t rows = balanced_part(n, row_bytes > 0 ? kScoreBytes / row_bytes : n);
    torch::Tensor out;
    if (rows >= n) {
        out = attend_rows(q);
    } else {
        std::vector<torch::Tensor> parts;
        for (int64_t i = 0; i < n; i += rows)
            parts.push_back(attend_rows(q.narrow(2, i, std::min(rows, n - i))));
        out = at::cat(parts, 2);
    }
#endif
    // [B, heads, N, dim_head] -> [B, N, heads*dim_head]
    out = out.transpose(1, 2).reshape({b, n, heads * dim_head});
    return to_out->forward(out);
}

// ---------------------------------------------------------------------------- AttnBlock

AttnBlockImpl::AttnBlockImpl(int64_t c, int64_t c_cond, int64_t nhead, bool self_attn_)
    : self_attn(self_attn_) {
    attention = register_module("attention", Attention(c, nhead, c / nhead));
    kv_mapper = register_module("kv_mapper",
                                torch::nn::Sequential(torch::nn::SiLU(), LoraLinear(c_cond, c)));
}

torch::nn::LinearImpl& AttnBlockImpl::kv_linear() {
    return *kv_mapper->ptr(1)->as<torch::nn::LinearImpl>();
}

torch::Tensor AttnBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& cond) {
    return forward_mapped(x, kv_mapper->forward(cond));
}

torch::Tensor AttnBlockImpl::forward_mapped(const torch::Tensor& x, const torch::Tensor& mapped) {
    const int64_t b = x.size(0);
    const int64_t c = x.size(1);
    const int64_t h = x.size(2);
    const int64_t w = x.size(3);
    // [B, C, H, W] -> [B, H*W, C]
    auto norm_x = layer_norm_2d(x).reshape({b, c, h * w}).transpose(1, 2);
    torch::Tensor attn;
    if (!self_attn)
        attn = attention->forward(norm_x, mapped);
    else if (mapped.size(-1) == 2 * c)  // keys and values projected ahead (map_kv_packed)
        attn = attention->forward_self_projected(norm_x, mapped);
    else
        attn = attention->forward_self(norm_x, torch::cat({norm_x, mapped}, 1));
    // [B, H*W, C] -> [B, C, H, W]
    return x + attn.transpose(1, 2).reshape({b, c, h, w});
}

// ---------------------------------------------------------------------------- condition mappers

namespace {

// The blocks of type Block among `blocks`, in order.
template <class Block>
std::vector<Block*> blocks_of(const std::vector<torch::nn::Module*>& blocks) {
    std::vector<Block*> out;
    for (auto* module : blocks)
        if (auto* block = dynamic_cast<Block*>(module)) out.push_back(block);
    return out;
}

// The Linear layer that maps the condition of each block of type Block, in order.
template <class Block, class Layer>
LinearGroup mappers_of(const std::vector<torch::nn::Module*>& blocks, Layer layer) {
    std::vector<torch::nn::LinearImpl*> layers;
    for (auto* block : blocks_of<Block>(blocks)) layers.push_back(layer(*block));
    return LinearGroup(std::move(layers));
}

}  // namespace

LinearGroup kv_mappers(const std::vector<torch::nn::Module*>& blocks) {
    return mappers_of<AttnBlockImpl>(blocks, [](AttnBlockImpl& b) { return &b.kv_linear(); });
}

LinearGroup timestep_mappers(const std::vector<torch::nn::Module*>& blocks) {
    return mappers_of<TimestepBlockImpl>(blocks,
                                         [](TimestepBlockImpl& b) { return b.mapper.get(); });
}

namespace {

// What a block's projected keys and values depend on besides the mapped condition.
std::vector<torch::Tensor> kv_source_tensors(const AttentionImpl& attention) {
    return {attention.to_k->weight, attention.to_k->bias, attention.to_v->weight,
            attention.to_v->bias};
}

}  // namespace

MappedKv map_kv_packed(const std::vector<torch::nn::Module*>& blocks, const torch::Tensor& cond,
                       bool project_kv) {
    const LinearGroup group = kv_mappers(blocks);
    if (!group.ready(cond.device())) return {};
    MappedKv out;
    out.kv = group.split(group.forward(at::silu(cond)));
    if (!project_kv) return out;
    // The text rows' keys and values are the same every step: each self-attention block's are
    // projected here, once per call (the pipelines ask on the CPU by default: projects_text_kv).
    const auto attention = blocks_of<AttnBlockImpl>(blocks);
    out.projected.resize(attention.size());
    for (size_t i = 0; i < attention.size(); ++i) {
        if (!attention[i]->self_attn) continue;
        const AttentionImpl& attn = *attention[i]->attention;
        std::vector<TensorSeen> seen;
        for (const auto& t : kv_source_tensors(attn)) seen.emplace_back(t);
        if (!std::all_of(seen.begin(), seen.end(), [](const TensorSeen& s) { return s.tracked(); }))
            continue;  // could not be checked later: projected per step instead
        auto projected = attn.project_kv(out.kv[i]);
        if (!projected.defined()) continue;
        out.kv[i] = std::move(projected);
        out.projected[i] = std::move(seen);
    }
    return out;
}

std::shared_ptr<const ConditionSource> note_condition_source(
    const NamedModules& mappers, std::vector<std::vector<TensorSeen>> projected) {
    auto source = std::make_shared<ConditionSource>();
    source->mappers_tracked = true;
    for (const auto& [name, module] : mappers) {
        source->mappers.emplace_back(*module);
        source->mappers_tracked = source->mappers_tracked && source->mappers.back().tracked();
    }
    if (!source->mappers_tracked) source->mappers.clear();
    source->projected = std::move(projected);
    return source;
}

void check_condition_source(const std::vector<torch::Tensor>& kv, const ConditionSource* source,
                            const NamedModules& mappers,
                            const std::vector<torch::nn::Module*>& blocks,
                            const std::string& where) {
    if (source != nullptr && source->mappers_tracked) {
        if (source->mappers.size() != mappers.size())
            throw InvalidArgument(
                where + ": the condition was mapped by " + std::to_string(source->mappers.size()) +
                " mapper modules, but this model maps it with " + std::to_string(mappers.size()) +
                " (another model's condition?): map it again");
        for (size_t i = 0; i < mappers.size(); ++i)
            if (!source->mappers[i].matches(*mappers[i].second))
                throw InvalidArgument(
                    where + ": the condition was mapped by " + mappers[i].first +
                    " as it was then, and its weights or LoRA state have changed since (replaced, "
                    "edited in place, an adapter added, enabled, rescaled or fused; also from a "
                    "step callback), or it is another model's condition: map it again");
    }
    const auto attention = blocks_of<AttnBlockImpl>(blocks);
    for (size_t i = 0; i < kv.size() && i < attention.size(); ++i) {
        const AttentionImpl& attn = *attention[i]->attention;
        const int64_t inner = attn.heads * attn.dim_head;
        if (!kv[i].defined() || kv[i].dim() != 3 || kv[i].size(2) != 2 * inner) continue;
        bool holds = attention[i]->self_attn && source != nullptr && i < source->projected.size() &&
                     !source->projected[i].empty();
        if (holds) {
            const auto tensors = kv_source_tensors(attn);
            for (size_t k = 0; holds && k < tensors.size(); ++k)
                holds = source->projected[i][k].matches(tensors[k]);
        }
        if (!holds)
            throw InvalidArgument(
                where +
                ": the condition's keys and values of the text (map_condition's "
                "project_kv) are not those of attention block " +
                std::to_string(i) +
                "'s weights now (replaced or changed since: a LoRA fused or unfused, weights "
                "edited in place, also from a step callback; or no source): map it again");
    }
}

void add_kv_mappers(const std::vector<torch::nn::Module*>& blocks, NamedModules& out) {
    const auto attention = blocks_of<AttnBlockImpl>(blocks);
    for (size_t i = 0; i < attention.size(); ++i)
        out.emplace_back("attention block " + std::to_string(i) + "'s kv_mapper",
                         attention[i]->kv_mapper.ptr().get());
}

MappedTimesteps map_timesteps_packed(const LinearGroup& group,
                                     const std::vector<torch::nn::Module*>& blocks,
                                     const torch::Tensor& r_embed) {
    MappedTimesteps mapped;
    if (!group.ready(r_embed.device())) return mapped;
    mapped.rows = group.forward(r_embed);
    add_one_to_scales(group, mapped.rows);
    const ResidualBiases biases(blocks);
    mapped.residual_biases_folded = biases.ready(group, mapped.rows);
    if (mapped.residual_biases_folded) biases.fold_into(group, mapped.rows);
    return mapped;
}

namespace {

// What rows mapped by `group` depend on besides r: its layers' weights and biases and, when the
// residual biases were folded into them, those.
std::vector<torch::Tensor> timestep_source_tensors(const LinearGroup& group,
                                                   const ResidualBiases& biases, bool folded) {
    std::vector<torch::Tensor> tensors;
    for (size_t i = 0; i < group.size(); ++i) {
        tensors.push_back(group.layer(i).weight);
        tensors.push_back(group.layer(i).bias);
    }
    if (folded)
        for (const auto* layer : biases.layers()) tensors.push_back(layer->bias);
    return tensors;
}

}  // namespace

MappedTimesteps map_timesteps_ahead(const std::vector<torch::nn::Module*>& blocks,
                                    const torch::Tensor& r_embed) {
    const LinearGroup group = timestep_mappers(blocks);
    MappedTimesteps mapped = map_timesteps_packed(group, blocks, r_embed);
    if (!mapped.defined()) return mapped;
    auto source = std::make_shared<TimestepSource>();
    source->residual_biases_folded = mapped.residual_biases_folded;
    for (const auto& tensor :
         timestep_source_tensors(group, ResidualBiases(blocks), mapped.residual_biases_folded)) {
        source->seen.emplace_back(tensor);
        if (!source->seen.back().tracked()) return {};
    }
    mapped.source = std::move(source);
    return mapped;
}

void check_mapped_timesteps(const MappedTimesteps& t, const std::vector<torch::nn::Module*>& blocks,
                            int64_t batch, const torch::Device& device, torch::ScalarType dtype,
                            const char* where) {
    const torch::Tensor& rows = t.rows;
    if (!rows.defined())
        throw InvalidArgument(std::string(where) +
                              ": the mapped timesteps are undefined (map_timesteps maps nothing "
                              "while the timestep mappers are not packed: pass r)");
    const LinearGroup group = timestep_mappers(blocks);
    if (group.size() == 0 || rows.dim() != 2 || (rows.size(0) != 1 && rows.size(0) != batch) ||
        rows.size(1) != group.total_out() || rows.device() != device || rows.scalar_type() != dtype)
        throw InvalidArgument(
            std::string(where) + ": the mapped timesteps must be map_timesteps' rows ([1 or " +
            std::to_string(batch) + ", " + std::to_string(group.total_out()) + "] on " +
            device.str() + " in " + c10::toString(dtype) + "), got " +
            c10::str(rows.sizes(), " on ", rows.device(), " in ", rows.scalar_type()));
    // Mapped by this model's map_timesteps from the weights it has now, unchanged since, and
    // the form they were mapped for still the one the blocks can run.
    const ResidualBiases biases(blocks);
    const bool folded = t.residual_biases_folded;
    bool holds = t.source && t.source->residual_biases_folded == folded && group.ready(device) &&
                 (!folded || biases.ready(group, rows));
    if (holds) {
        const auto tensors = timestep_source_tensors(group, biases, folded);
        holds = tensors.size() == t.source->seen.size();
        for (size_t i = 0; holds && i < tensors.size(); ++i)
            holds = t.source->seen[i].matches(tensors[i]);
    }
    if (!holds)
        throw InvalidArgument(
            std::string(where) +
            ": the mapped timesteps are not map_timesteps' for this model's current weights (a "
            "timestep mapper or residual bias replaced or changed since, a LoRA adapter on one "
            "added or enabled, or autograd on): map them again");
}

bool pack_condition_mappers(const std::vector<torch::nn::Module*>& blocks) {
    const bool kv = kv_mappers(blocks).pack();
    ResidualBiases(blocks).pack();  // where the fold applies (not part of the result)
    return timestep_mappers(blocks).pack() && kv;
}

// ---------------------------------------------------------------------------- ResidualBiases

namespace {

ChannelwiseMLPImpl* channelwise_of(torch::nn::Module* block) {
    if (block == nullptr) return nullptr;
    for (const auto& child : block->named_children())
        if (child.key() == "channelwise") return child.value()->as<ChannelwiseMLPImpl>();
    return nullptr;
}

}  // namespace

ResidualBiases::ResidualBiases(const std::vector<torch::nn::Module*>& blocks) {
    // One to one: every timestep block right after a residual block, and every residual block
    // right before a timestep block (a residual block followed by anything else would lose its
    // bias: the pipelines' fold is all or nothing).
    std::vector<ChannelwiseMLPImpl*> mlps;  // each block's, when it is a residual block
    std::vector<bool> timestep;
    for (auto* block : blocks) {
        mlps.push_back(channelwise_of(block));
        timestep.push_back(dynamic_cast<TimestepBlockImpl*>(block) != nullptr);
    }
    for (size_t i = 0; i < blocks.size(); ++i) {
        const bool follows_residual = i > 0 && mlps[i - 1] != nullptr;
        const bool precedes_timestep = i + 1 < blocks.size() && timestep[i + 1];
        if ((timestep[i] && !follows_residual) || (mlps[i] != nullptr && !precedes_timestep)) {
            layers_.clear();
            return;
        }
        if (timestep[i]) layers_.push_back(mlps[i - 1]->fc2.get());
    }
}

bool ResidualBiases::packed() const {
    for (const auto* layer : layers_)
        if (!layer->bias.defined() || layer->bias.dim() != 1) return false;
    return rows_back_to_back(layers_, &torch::nn::LinearImpl::bias);
}

bool ResidualBiases::pack() {
    if (layers_.empty()) return false;
    const torch::Tensor& first = layers_[0]->bias;
    for (const auto* layer : layers_) {
        const torch::Tensor& b = layer->bias;
        if (!b.defined() || b.dim() != 1 || b.scalar_type() != first.scalar_type() ||
            b.device() != first.device())
            return false;
    }
    put_rows_back_to_back(layers_, &torch::nn::LinearImpl::bias);
    return true;
}

bool ResidualBiases::ready(const LinearGroup& timesteps, const torch::Tensor& all) const {
    if (at::GradMode::is_enabled() || layers_.size() != timesteps.size() || !packed()) return false;
    const torch::Tensor& first = layers_[0]->bias;
    if (first.device() != all.device() || first.scalar_type() != all.scalar_type() ||
        all.dim() != 2 || all.size(1) != timesteps.total_out())
        return false;
    for (size_t i = 0; i < layers_.size(); ++i)
        if (2 * layers_[i]->bias.size(0) != timesteps.out_features(i) ||
            lora_contributes(*layers_[i]))
            return false;
    return true;
}

void ResidualBiases::fold_into(const LinearGroup& timesteps, torch::Tensor& all) const {
    TORCH_CHECK(ready(timesteps, all), "ResidualBiases::fold_into: not ready");
    // All biases as one vector: the buffer they view, from the first one's row on.
    int64_t total = 0;
    for (const auto* layer : layers_) total += layer->bias.size(0);
    const auto biases = buffer_view(layers_[0]->bias, {total}, {1});
    for (const auto& [first, count] : timesteps.equal_width_runs()) {
        // A run of equally wide blocks: [B, n, 2C] = [1 + a, b]; their biases [n, C], back to
        // back from half the run's offset on.
        const int64_t width = timesteps.out_features(first), half = width / 2;
        const auto n = static_cast<int64_t>(count);
        const auto run =
            all.narrow(1, timesteps.offset(first), n * width).view({all.size(0), n, width});
        run.narrow(2, half, half)
            .addcmul_(run.narrow(2, 0, half),
                      biases.narrow(0, timesteps.offset(first) / 2, n * half).view({n, half}));
    }
}

bool pack_attention_projections(const std::vector<torch::nn::Module*>& blocks) {
    bool all = true;
    for (auto* block : blocks_of<AttnBlockImpl>(blocks))
        if (block->self_attn) all = block->attention->projections().pack() && all;
    return all;
}

void add_one_to_scales(const LinearGroup& group, torch::Tensor& all) {
    TORCH_CHECK(all.dim() == 2 && all.size(1) == group.total_out(),
                "add_one_to_scales: expected [B, ", group.total_out(), "], got ", all.sizes());
    for (const auto& [first, count] : group.equal_width_runs()) {
        // A run of equally wide layers, back to back: [B, n, 2C], a = [..., :C].
        const int64_t width = group.out_features(first);
        TORCH_CHECK(width % 2 == 0, "add_one_to_scales: layer ", first, " has ", width,
                    " outputs, not [a, b] halves");
        const auto n = static_cast<int64_t>(count);
        all.narrow(1, group.offset(first), n * width)
            .view({all.size(0), n, width})
            .narrow(2, 0, width / 2)
            .add_(1);
    }
}

// ---------------------------------------------------------------------------- ConvTranspose2d

namespace {
torch::nn::ConvTranspose2dOptions conv_transpose_options(int64_t c_in, int64_t c_out,
                                                         int64_t kernel_size, int64_t stride,
                                                         int64_t padding) {
    return torch::nn::ConvTranspose2dOptions(c_in, c_out, kernel_size)
        .stride(stride)
        .padding(padding);
}
}  // namespace

CpuSafeConvTranspose2dImpl::CpuSafeConvTranspose2dImpl(int64_t c_in, int64_t c_out,
                                                       int64_t kernel_size, int64_t stride,
                                                       int64_t padding)
    : torch::nn::ConvTranspose2dImpl(
          base_options(conv_transpose_options(c_in, c_out, kernel_size, stride, padding))),
      stride_(stride),
      padding_(padding) {
    finish_conv_transpose(*this, conv_transpose_options(c_in, c_out, kernel_size, stride, padding));
}

torch::Tensor CpuSafeConvTranspose2dImpl::forward(const torch::Tensor& x) {
    if (!widened_on_cpu(x)) return torch::nn::ConvTranspose2dImpl::forward(x);
    const auto f32 = [](const torch::Tensor& t) {
        return t.defined() ? t.to(torch::kFloat32) : t;
    };
    return at::conv_transpose2d(f32(x), f32(weight), f32(bias), {stride_, stride_},
                                {padding_, padding_})
        .to(x.scalar_type());
}

// ---------------------------------------------------------------------------- r embedding

torch::Tensor r_embedding(const torch::Tensor& r, int64_t c_r, double max_positions) {
    // gen_r_embedding: r * max_positions in r's dtype (as upstream), the rest in float32.
    auto scaled = (r * max_positions).to(torch::kFloat32);
    const int64_t half_dim = c_r / 2;
    // Upstream: arange(half_dim).float().mul(-log(max_positions) / (half_dim - 1)).exp(), i.e.
    // the exponent is the float32 product k * float(-step), then exp. sin/cos are evaluated at
    // arguments up to 1e4, where one ulp of a frequency shows, so the exp must be accurate:
    // libtorch 1.13's vectorised float exp is off by an ulp for many k (error 4.5e-4 in the
    // embedding); exp in double rounded once to float reproduces diffusers' r_embed within 5e-7.
    const float neg_step =
        static_cast<float>(-std::log(max_positions) / static_cast<double>(half_dim - 1));
    // On r's device, without a host-to-device copy (so a CUDA graph can capture it): the float32
    // product k * neg_step (one rounding, as upstream), then exp in double rounded once.
    const auto k = at::arange(half_dim, scaled.options());
    const auto freq = (k * neg_step).to(torch::kFloat64).exp().to(torch::kFloat32);
    auto emb = scaled.unsqueeze(1) * freq.unsqueeze(0);  // [B, half_dim]
    emb = torch::cat({emb.sin(), emb.cos()}, 1);
    if (c_r % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1}, 0);
    return emb.to(r.scalar_type());
}

}  // namespace wuerstchen::nn

namespace wuerstchen {

MappedTimesteps MappedTimesteps::row(int64_t i) const {
    if (!rows.defined() || rows.dim() != 2 || i < 0 || i >= rows.size(0))
        throw InvalidArgument("MappedTimesteps::row: no row " + std::to_string(i) + " in " +
                              (rows.defined() ? c10::str(rows.sizes()) : std::string("undefined")));
    return with_rows(rows.narrow(0, i, 1));
}

}  // namespace wuerstchen
