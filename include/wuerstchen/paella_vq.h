#pragma once

// Stage A: diffusers' PaellaVQModel, the VQGAN that turns stage-B latents into pixels (and images
// into latents). Child names are the diffusers attribute names with Sequential indices kept
// (vqgan/diffusion_pytorch_model.safetensors).

#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>

#include <string>

#include "wuerstchen/config.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

// diffusers' VectorQuantizer (legacy=False, beta=0.25) at inference: nearest codebook vector by
// euclidean distance. Keys: embedding.weight [num_vq_embeddings, latent_channels]
struct VectorQuantizerImpl : torch::nn::Module {
    VectorQuantizerImpl(int64_t n_e, int64_t vq_embed_dim);

    struct Output {
        torch::Tensor quantized;  // [B, C, H, W]
        torch::Tensor indices;    // [B*H*W] int64, row-major over (B, H, W) as upstream
    };
    // z: [B, C, H, W] -> quantized [B, C, H, W] + code indices
    Output forward(const torch::Tensor& z);

    torch::nn::Embedding embedding{nullptr};
};
TORCH_MODULE(VectorQuantizer);

struct PaellaVQModelImpl : torch::nn::Module {
    explicit PaellaVQModelImpl(const PaellaVQConfig& config);

    // image: [B, in_channels, H, W] in [0, 1] (H, W divisible by
    // up_down_scale_factor * 2^(levels-1)) -> latents [B, latent_channels, h, w] (unquantized).
    torch::Tensor encode(const torch::Tensor& image);
    // latents: [B, latent_channels, h, w] -> image [B, out_channels, H, W] (not clamped).
    // force_not_quantize = true (upstream's default) decodes the latents as they are; false snaps
    // them to the codebook first.
    torch::Tensor decode(const torch::Tensor& latents, bool force_not_quantize = true);
    // encode then decode (upstream forward).
    torch::Tensor forward(const torch::Tensor& image);

    const PaellaVQConfig& config() const { return config_; }
    double scale_factor() const { return config_.scale_factor; }

    // Working memory of encode / decode. Each mixing block works through the batch in bands of
    // image rows (several whole images per band when they fit), each band's channelwise hidden
    // activation (4x the block's width) at most about `bytes`, at least one row; 0 = the whole
    // batch at once, as upstream. The result does not depend on it beyond the last bits (matrix
    // products over fewer rows). At 1024x1024 in fp16 a whole-image band makes the last block's
    // hidden activation 402 MB on its own. While autograd records through the model (grad mode
    // on and the input or a weight requiring grad) the blocks run upstream's whole-batch form.
    static constexpr int64_t kDefaultBandBytes = int64_t{64} << 20;
    void set_band_bytes(int64_t bytes);
    int64_t band_bytes() const { return band_bytes_; }

    torch::nn::Sequential in_block{nullptr};  // {PixelUnshuffle, Conv2d 1x1}
    torch::nn::Sequential down_blocks{
        nullptr};  // mixing blocks, strided convs, {Conv, BatchNorm2d}
    VectorQuantizer vquantizer{nullptr};
    torch::nn::Sequential up_blocks{nullptr};  // {Conv 1x1}, mixing blocks, transposed convs
    torch::nn::Sequential out_block{nullptr};  // {Conv2d 1x1, PixelShuffle}

private:
    PaellaVQConfig config_;
    int64_t band_bytes_ = kDefaultBandBytes;
};
TORCH_MODULE(PaellaVQModel);

// Builds the model from <dir>/config.json and loads <dir>/diffusion_pytorch_model.safetensors
// (or its shards / fp16 variant). Throws ConfigError, IoError or WeightError naming the file.
PaellaVQModel load_paella_vq(const std::string& dir, const LoadOptions& options = {});

}  // namespace wuerstchen
