#include "wuerstchen/clip_text_model.h"

#include <ATen/Dispatch.h>
#include <torch/nn/functional/activation.h>
#include <torch/version.h>

#include <cmath>
#include <limits>

#include "nn/init.h"
#include "nn/linear_group.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"

namespace wuerstchen {

namespace {

enum class Activation { Gelu, QuickGelu, GeluTanh, Relu };

Activation parse_activation(const std::string& name) {
    if (name == "gelu") return Activation::Gelu;
    if (name == "quick_gelu") return Activation::QuickGelu;
    if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast")
        return Activation::GeluTanh;
    if (name == "relu") return Activation::Relu;
    throw ConfigError("CLIPTextConfig: key 'hidden_act' has unsupported value '" + name +
                      "' (expected gelu, quick_gelu, gelu_new, gelu_pytorch_tanh, relu)");
}

torch::Tensor activate(const torch::Tensor& x, Activation act) {
    switch (act) {
        case Activation::Gelu:
            return torch::gelu(x);
        case Activation::QuickGelu:
            // transformers QuickGELUActivation: x * sigmoid(1.702 x)
            return x * torch::sigmoid(1.702 * x);
        case Activation::GeluTanh:
            return torch::gelu(x, "tanh");
        case Activation::Relu:
            return torch::relu(x);
    }
    return x;
}

// CLIPAttention.  Keys: {q,k,v,out}_proj.{weight,bias}
struct CLIPAttentionImpl : torch::nn::Module {
    CLIPAttentionImpl(int64_t dim, int64_t heads) : heads(heads), head_dim(dim / heads) {
        q_proj = register_module("q_proj", LoraLinear(dim, dim));
        k_proj = register_module("k_proj", LoraLinear(dim, dim));
        v_proj = register_module("v_proj", LoraLinear(dim, dim));
        out_proj = register_module("out_proj", LoraLinear(dim, dim));
    }

    // q_proj, k_proj, v_proj as one group (CLIPTextModelImpl::pack_attention_projections).
    nn::LinearGroup projections() const {
        return nn::LinearGroup({q_proj.ptr().get(), k_proj.ptr().get(), v_proj.ptr().get()});
    }

    // x: [B, L, D], mask: [B or 1, 1, L, L] from attention_mask_for() -> [B, L, D]
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask) {
        const int64_t batch = x.size(0), length = x.size(1), dim = x.size(2);
        auto split = [&](const torch::Tensor& t) {
            return t.view({batch, length, heads, head_dim}).transpose(1, 2);  // [B, H, L, hd]
        };
        torch::Tensor q, k, v;
        const nn::LinearGroup group = projections();
        if (group.ready(x.device())) {
            // One product [B, L, 3D]; q, k and v are column views of it (the attention reads
            // strided heads anyway).
            const auto qkv = group.forward(x);
            q = split(group.columns(qkv, 0));
            k = split(group.columns(qkv, 1));
            v = split(group.columns(qkv, 2));
        } else {
            q = split(q_proj(x));
            k = split(k_proj(x));
            v = split(v_proj(x));
        }
#if TORCH_VERSION_MAJOR >= 2
        // softmax(q k^T / sqrt(hd) + mask) v in one call; the fused kernels keep the scores in
        // float32 (transformers' default "sdpa" attention makes the same call).
        const auto attended = at::scaled_dot_product_attention(q, k, v, mask);
#else
        // Scores and softmax in fp32 (transformers' eager path softmaxes in fp32 as well).
        const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
        auto scores = torch::matmul(q, k.transpose(-2, -1)).to(torch::kFloat32) * scale;
        scores = scores.masked_fill(mask, std::numeric_limits<float>::lowest());
        const auto probs = torch::softmax(scores, -1).to(x.scalar_type());
        const auto attended = torch::matmul(probs, v);
#endif
        return out_proj(attended.transpose(1, 2).reshape({batch, length, dim}));
    }

    int64_t heads, head_dim;
    LoraLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(CLIPAttention);

// CLIPMLP.  Keys: fc1.*, fc2.*
struct CLIPMLPImpl : torch::nn::Module {
    CLIPMLPImpl(int64_t dim, int64_t hidden, Activation act) : act(act) {
        fc1 = register_module("fc1", LoraLinear(dim, hidden));
        fc2 = register_module("fc2", LoraLinear(hidden, dim));
    }
    // x: [B, L, D] -> [B, L, D]
    torch::Tensor forward(const torch::Tensor& x) { return fc2(activate(fc1(x), act)); }

    Activation act;
    LoraLinear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(CLIPMLP);

torch::nn::LayerNorm make_layer_norm(int64_t dim, double eps) {
    return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(eps));
}

}  // namespace

// CLIPEncoderLayer (pre-LN).  Keys: self_attn.*, layer_norm1.*, mlp.*, layer_norm2.*
struct CLIPTextModelImpl::Layer : torch::nn::Module {
    explicit Layer(const CLIPTextConfig& c) {
        const Activation act = parse_activation(c.hidden_act);
        self_attn =
            register_module("self_attn", CLIPAttention(c.hidden_size, c.num_attention_heads));
        layer_norm1 =
            register_module("layer_norm1", make_layer_norm(c.hidden_size, c.layer_norm_eps));
        mlp = register_module("mlp", CLIPMLP(c.hidden_size, c.intermediate_size, act));
        layer_norm2 =
            register_module("layer_norm2", make_layer_norm(c.hidden_size, c.layer_norm_eps));
    }

    // x: [B, L, D] -> [B, L, D]
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask) {
        auto h = x + self_attn(layer_norm1(x), mask);
        return h + mlp(layer_norm2(h));
    }

    CLIPAttention self_attn{nullptr};
    torch::nn::LayerNorm layer_norm1{nullptr};
    CLIPMLP mlp{nullptr};
    torch::nn::LayerNorm layer_norm2{nullptr};
};

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& config) : config_(config) {
    config_.validate();
    if (config_.hidden_size % config_.num_attention_heads != 0)
        throw ConfigError("CLIPTextConfig: hidden_size " + std::to_string(config_.hidden_size) +
                          " is not divisible by num_attention_heads " +
                          std::to_string(config_.num_attention_heads));
    parse_activation(config_.hidden_act);  // fail early on an unknown activation

    embeddings_ =
        register_module("embeddings", std::make_shared<torch::nn::Module>("CLIPTextEmbeddings"));
    token_embedding_ = embeddings_->register_module(
        "token_embedding", nn::embedding(config_.vocab_size, config_.hidden_size));
    position_embedding_ = embeddings_->register_module(
        "position_embedding", nn::embedding(config_.max_position_embeddings, config_.hidden_size));

    encoder_ = register_module("encoder", std::make_shared<torch::nn::Module>("CLIPEncoder"));
    layers_ = encoder_->register_module("layers", torch::nn::ModuleList());
    for (int i = 0; i < config_.num_hidden_layers; ++i)
        layers_->push_back(std::make_shared<Layer>(config_));

    final_layer_norm_ = register_module(
        "final_layer_norm", make_layer_norm(config_.hidden_size, config_.layer_norm_eps));
}

torch::Tensor CLIPTextModelImpl::attention_mask_for(const torch::Tensor& attention_mask,
                                                    int64_t batch, int64_t length,
                                                    torch::ScalarType dtype) const {
    // The causal mask combined with the padding mask over keys, [B or 1, 1, L, L], made once for
    // all layers.
    const auto device = token_embedding_->weight.device();
    const auto bool_options = torch::TensorOptions().dtype(torch::kBool).device(device);
    auto hidden_keys =
        torch::ones({length, length}, bool_options).triu(1).view({1, 1, length, length});
    if (attention_mask.defined()) {
        hidden_keys =
            hidden_keys.logical_or(attention_mask.to(device).eq(0).view({batch, 1, 1, length}));
        // A query whose every key is hidden (before the first unmasked token, with left padding)
        // sees all keys instead, as transformers does for its default attention: fused kernels
        // give NaN for a fully hidden row, which later layers would spread to every position.
        // Later queries never read such a row (its key stays hidden from them).
        hidden_keys = hidden_keys.logical_and(hidden_keys.all(-1, /*keepdim=*/true).logical_not());
    }
#if TORCH_VERSION_MAJOR >= 2
    // Additive, in the model's dtype: 0 where a key is seen, the lowest finite value where it is
    // hidden. Rows padded to a multiple of 16 elements, so the memory-efficient CUDA kernel
    // takes the mask without padding it again in every layer.
    const int64_t padded = (length + 15) / 16 * 16;
    const double lowest = AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "clip_attention_mask",
        [] { return static_cast<double>(std::numeric_limits<scalar_t>::lowest()); });
    return at::zeros({hidden_keys.size(0), 1, length, padded},
                     torch::TensorOptions().dtype(dtype).device(device))
        .narrow(-1, 0, length)
        .masked_fill_(hidden_keys, lowest);
#else
    (void)dtype;
    return hidden_keys;  // true where a key is hidden from the query
#endif
}

CLIPTextOutput CLIPTextModelImpl::forward(const torch::Tensor& input_ids,
                                          const torch::Tensor& attention_mask,
                                          bool output_hidden_states) {
    if (input_ids.dim() != 2)
        throw InvalidArgument("CLIPTextModel: input_ids must be [B, L], got " +
                              std::to_string(input_ids.dim()) + " dimensions");
    if (!at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false))
        throw InvalidArgument("CLIPTextModel: input_ids must be integer token ids, got " +
                              std::string(c10::toString(input_ids.scalar_type())));
    const int64_t batch = input_ids.size(0), length = input_ids.size(1);
    if (length < 1) throw InvalidArgument("CLIPTextModel: input_ids hold no tokens (L = 0)");
    // Ids are range-checked where they are or arrive on the CPU (an out-of-range embedding
    // index would be an untyped error, on CUDA a device-side assert); ids on a GPU for a model
    // on a GPU are not, as the check would wait for the device (the pipelines check their
    // tokenizer against the vocabulary instead).
    const auto device = token_embedding_->weight.device();
    if ((input_ids.device().is_cpu() || device.is_cpu()) && batch > 0) {
        const auto [lowest, highest] = at::aminmax(input_ids.to(torch::kCPU));
        const int64_t low = lowest.item<int64_t>(), high = highest.item<int64_t>();
        if (low < 0 || high >= config_.vocab_size)
            throw InvalidArgument(
                "CLIPTextModel: input_ids hold token id " + std::to_string(low < 0 ? low : high) +
                ", outside the vocabulary [0, " + std::to_string(config_.vocab_size) + ")");
    }
    if (length > config_.max_position_embeddings)
        throw InvalidArgument("CLIPTextModel: sequence length " + std::to_string(length) +
                              " exceeds max_position_embeddings " +
                              std::to_string(config_.max_position_embeddings));
    if (attention_mask.defined() && attention_mask.sizes() != input_ids.sizes())
        throw InvalidArgument("CLIPTextModel: attention_mask shape differs from input_ids");

    const auto ids = input_ids.to(device, torch::kInt64);

    // Embeddings: token + absolute position.  [B, L] -> [B, L, D]
    const auto positions =
        torch::arange(length, torch::TensorOptions().dtype(torch::kInt64).device(device));
    auto hidden = token_embedding_(ids) + position_embedding_(positions).unsqueeze(0);

    const auto mask = attention_mask_for(attention_mask, batch, length, hidden.scalar_type());
    CLIPTextOutput out;
    for (const auto& module : *layers_) {
        if (output_hidden_states) out.hidden_states.push_back(hidden);
        hidden = run_unit(block_hook, *module,
                          [&] { return module->as<Layer>()->forward(hidden, mask); });
    }
    if (output_hidden_states) out.hidden_states.push_back(hidden);
    out.last_hidden_state = final_layer_norm_(hidden);

    // transformers: the legacy configs (eos_token_id == 2) take the argmax of the ids (the eos
    // token has the largest id in CLIP's vocabulary); others the first position holding eos.
    torch::Tensor eos_index;
    if (config_.eos_token_id == 2)
        eos_index = ids.argmax(-1);
    else
        eos_index = ids.eq(config_.eos_token_id).to(torch::kInt32).argmax(-1);
    const auto rows =
        torch::arange(batch, torch::TensorOptions().dtype(torch::kInt64).device(device));
    out.pooler_output = out.last_hidden_state.index({rows, eos_index});
    return out;
}

bool CLIPTextModelImpl::pack_attention_projections() {
    bool all = true;
    for (const auto& layer : *layers_)
        all = layer->as<Layer>()->self_attn->projections().pack() && all;
    return all;
}

std::vector<torch::nn::Module*> CLIPTextModelImpl::offload_units() const {
    std::vector<torch::nn::Module*> units;
    for (const auto& layer : *layers_) units.push_back(layer.get());
    return units;
}

CLIPTextModel load_clip_text_model(const std::string& dir, const LoadOptions& options) {
    const auto config = CLIPTextConfig::from_file(dir + "/config.json");
    auto model = build_unwritten<CLIPTextModel>(config);
    load_weights(*model, find_weight_files(dir, "model"), options);
    prepare_module(*model, options);
    if (!options.offload && !options.sequential_offload) model->pack_attention_projections();
    return model;
}

}  // namespace wuerstchen
