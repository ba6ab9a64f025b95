#pragma once

// transformers CLIPTextModel: token + position embeddings, pre-LN encoder layers with a causal
// mask combined with the padding mask, final layer norm. Parameter names are transformers' keys
// (without the legacy "text_model." prefix, which the loader strips).

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <vector>

#include "wuerstchen/block_hook.h"
#include "wuerstchen/config.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

struct CLIPTextOutput {
    torch::Tensor last_hidden_state;           // [B, L, hidden]
    torch::Tensor pooler_output;               // [B, hidden], the state at the first eos
    std::vector<torch::Tensor> hidden_states;  // embeddings output, then each layer (if asked)
};

struct CLIPTextModelImpl : torch::nn::Module {
    explicit CLIPTextModelImpl(const CLIPTextConfig& config);

    // input_ids: [B, L] int64; attention_mask: [B, L] (1 = keep), optional.
    CLIPTextOutput forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                           bool output_hidden_states = false);

    const CLIPTextConfig& config() const { return config_; }

    // Stores each layer's q_proj, k_proj and v_proj weights back to back in one buffer (and the
    // biases in another; the parameters view their rows: same names, shapes and values), so that
    // the layer projects queries, keys and values in one matrix product instead of three. The
    // loader and the pipelines call it unless offloading. Anything that later replaces those
    // weights (a move to another device, a LoRA fuse) undoes it; forward then projects per layer,
    // as it does while an unfused LoRA adapter on them contributes. Returns whether every layer's
    // are packed (a no-op for those already packed).
    bool pack_attention_projections();

    // Sequential offload: the encoder layers in order; forward calls block_hook around each when
    // it is set.
    std::vector<torch::nn::Module*> offload_units() const;
    BlockHook* block_hook = nullptr;

private:
    CLIPTextConfig config_;
    struct Layer;  // CLIPEncoderLayer, defined in the .cpp
    // The attention mask every layer reads: the causal mask with attention_mask's padded keys
    // (when given) hidden, [B or 1, 1, L, L]. On libtorch 2.x additive in `dtype` (0 or the
    // lowest finite value), for scaled_dot_product_attention; before, bool (true = hidden).
    torch::Tensor attention_mask_for(const torch::Tensor& attention_mask, int64_t batch,
                                     int64_t length, torch::ScalarType dtype) const;
    // Plain containers that only give the keys their transformers prefixes:
    // embeddings.{token,position}_embedding, encoder.layers.N.
    std::shared_ptr<torch::nn::Module> embeddings_;
    std::shared_ptr<torch::nn::Module> encoder_;
    torch::nn::Embedding token_embedding_{nullptr};
    torch::nn::Embedding position_embedding_{nullptr};
    torch::nn::ModuleList layers_{nullptr};
    torch::nn::LayerNorm final_layer_norm_{nullptr};
};
TORCH_MODULE(CLIPTextModel);

// Builds the model from <dir>/config.json and loads <dir>/model.safetensors (or shards).
CLIPTextModel load_clip_text_model(const std::string& dir, const LoadOptions& options);

}  // namespace wuerstchen
