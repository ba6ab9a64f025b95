#include "wuerstchen/paella_vq.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/functional.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/padding.h>
#include <torch/nn/modules/pixelshuffle.h>

#include <algorithm>
#include <vector>

#include "nn/blocks.h"
#include "nn/functional.h"
#include "nn/init.h"
#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"

namespace wuerstchen {

namespace {

// A Sequential that can sit inside another Sequential (AnyModule needs a non-template forward).
struct NestedSequentialImpl : torch::nn::SequentialImpl {
    using torch::nn::SequentialImpl::SequentialImpl;
    torch::Tensor forward(torch::Tensor x) { return torch::nn::SequentialImpl::forward(x); }
};
TORCH_MODULE(NestedSequential);

// Paella's MixingResidualBlock: a modulated depthwise branch and a modulated channelwise branch,
// each scaled by learned gammas. Keys: depthwise.1.*, channelwise.{0,2}.*, gammas [6]
//
// Upstream (one pass each over the whole image):
//   x = input + depthwise(pad(LN(input) * (1 + g0) + g1)) * g2
//   out = x + channelwise(LN(x) * (1 + g3) + g4) * g5
// Both branches are per position except the 3x3 depthwise conv, so the block runs them band by
// band of image rows (the conv reads one halo row above and below), writing each band of the
// output in place: what is alive at once is the input, the output and one band's temporaries,
// instead of five or six whole-image tensors (the channelwise hidden activation alone is four
// times the input). The arithmetic of every element is upstream's. With autograd recording,
// upstream's whole-batch form runs instead.
struct MixingResidualBlockImpl : torch::nn::Module {
    MixingResidualBlockImpl(int64_t c, int64_t embed_dim) {
        depthwise = register_module(
            "depthwise",
            torch::nn::Sequential(
                torch::nn::Functional([](torch::Tensor x) { return nn::replication_pad_2d(x, 1); }),
                nn::conv2d(torch::nn::Conv2dOptions(c, c, 3).groups(c))));
        channelwise = register_module(
            "channelwise", torch::nn::Sequential(nn::linear(c, embed_dim), torch::nn::GELU(),
                                                 nn::linear(embed_dim, c)));
        gammas = register_parameter("gammas", torch::zeros({6}));
        conv = depthwise->ptr<torch::nn::Conv2dImpl>(1);
        fc1 = channelwise->ptr<torch::nn::LinearImpl>(0);
        fc2 = channelwise->ptr<torch::nn::LinearImpl>(2);
    }

    // x: [B, C, H, W] -> [B, C, H, W]
    torch::Tensor forward(const torch::Tensor& input) {
        const int64_t batch = input.size(0);
        const int64_t height = input.size(2);
        const int64_t hidden = fc1->weight.size(0);
        const int64_t row_bytes =
            input.size(3) * hidden * static_cast<int64_t>(input.element_size());
        // The bands write into a preallocated output, which autograd cannot follow; empty
        // images have no bands.
        if (records_autograd(input) || row_bytes == 0 || height == 0 || batch == 0)
            return forward_whole(input);
        // Rows per band within the budget, bands of equal size (no one-row remainder); when a
        // whole image fits, as many images per band as fit.
        const int64_t rows =
            nn::balanced_part(height, band_bytes <= 0 ? height : band_bytes / row_bytes);
        const int64_t images =
            band_bytes <= 0 ? batch
            : rows < height ? 1
                            : std::clamp<int64_t>(band_bytes / (height * row_bytes), 1, batch);
        // The gammas are 0-d, read on the device; 1 + g is computed once per call.
        const auto& g = gammas;
        const torch::Tensor scale0 = 1 + g[0];
        const torch::Tensor scale3 = 1 + g[3];
        torch::Tensor out = at::empty_like(input);
        for (int64_t b = 0; b < batch; b += images) {
            const int64_t k = std::min(images, batch - b);
            const torch::Tensor in_b = input.narrow(0, b, k);
            const torch::Tensor out_b = out.narrow(0, b, k);
            for (int64_t top = 0; top < height; top += rows) {
                const int64_t n = std::min(rows, height - top);
                // Rows [lo, hi) with a halo row on each side inside the image; outside it, the
                // replication pad supplies the edge row, as on the whole image.
                const int64_t lo = std::max<int64_t>(top - 1, 0);
                const int64_t hi = std::min(top + n + 1, height);
                torch::Tensor t = nn::layer_norm_2d(in_b.narrow(2, lo, hi - lo), 1e-6);
                at::addcmul_out(t, g[1], t, scale0);
                t = conv->forward(nn::replication_pad_2d(t, 1)).narrow(2, top - lo, n);
                torch::Tensor x = out_b.narrow(2, top, n);
                at::addcmul_out(x, in_b.narrow(2, top, n), t, g[2]);
                // [k, C, n, W] -> [k, n, W, C] for the Linears; the result goes back into x.
                t = nn::layer_norm_last(x.permute({0, 2, 3, 1}), 1e-6);
                at::addcmul_out(t, g[4], t, scale3);
                t = nn::linear_forward(t, fc1->weight, fc1->bias);
                at::gelu_(t);
                t = nn::linear_forward(t, fc2->weight, fc2->bias).permute({0, 3, 1, 2});
                x.addcmul_(t, g[5]);
            }
        }
        return out;
    }

    // Upstream's formulation, out of place over the whole image (each addcmul one pass).
    torch::Tensor forward_whole(const torch::Tensor& input) {
        const auto& g = gammas;
        auto x_temp = at::addcmul(g[1], nn::layer_norm_2d(input, 1e-6), 1 + g[0]);
        auto x = at::addcmul(input, depthwise->forward(x_temp), g[2]);
        x_temp = at::addcmul(g[4], nn::layer_norm_2d(x, 1e-6), 1 + g[3]);
        // [B, C, H, W] -> [B, H, W, C] for the Linears, and back.
        return at::addcmul(
            x, channelwise->forward(x_temp.permute({0, 2, 3, 1})).permute({0, 3, 1, 2}), g[5]);
    }

    // Gradients are being recorded through this block (training, or a gradient with respect to
    // the input): in-place writes into a preallocated output would refuse them.
    bool records_autograd(const torch::Tensor& input) const {
        if (!at::GradMode::is_enabled()) return false;
        if (input.requires_grad()) return true;
        for (const auto& p : parameters())
            if (p.requires_grad()) return true;
        return false;
    }

    torch::nn::Sequential depthwise{nullptr};
    torch::nn::Sequential channelwise{nullptr};
    torch::Tensor gammas;
    std::shared_ptr<torch::nn::Conv2dImpl> conv;  // depthwise.1
    std::shared_ptr<torch::nn::LinearImpl> fc1;   // channelwise.0
    std::shared_ptr<torch::nn::LinearImpl> fc2;   // channelwise.2
    int64_t band_bytes = PaellaVQModelImpl::kDefaultBandBytes;
};
TORCH_MODULE(MixingResidualBlock);

}  // namespace

VectorQuantizerImpl::VectorQuantizerImpl(int64_t n_e, int64_t vq_embed_dim) {
    embedding = register_module("embedding", nn::embedding(n_e, vq_embed_dim));
}

VectorQuantizerImpl::Output VectorQuantizerImpl::forward(const torch::Tensor& z_in) {
    const auto& codebook = embedding->weight;  // [n_e, C]
    // [B, C, H, W] -> [B, H, W, C] -> [B*H*W, C]
    auto z = z_in.permute({0, 2, 3, 1}).contiguous();
    auto flat = z.view({-1, codebook.size(1)});
    auto indices = at::argmin(at::cdist(flat, codebook), 1);
    auto z_q = embedding->forward(indices).view(z.sizes());
    // Upstream's straight-through form z + (z_q - z): kept for bit parity with the reference.
    z_q = z + (z_q - z);
    return {z_q.permute({0, 3, 1, 2}).contiguous(), indices};
}

PaellaVQModelImpl::PaellaVQModelImpl(const PaellaVQConfig& config) : config_(config) {
    config_.validate();
    const int64_t levels = config_.levels;
    const int64_t scale = config_.up_down_scale_factor;
    std::vector<int64_t> c_levels;  // embed_dim / 2^i for i = levels-1 .. 0
    for (int64_t i = levels - 1; i >= 0; --i) c_levels.push_back(config_.embed_dim >> i);

    in_block = register_module(
        "in_block",
        torch::nn::Sequential(torch::nn::PixelUnshuffle(torch::nn::PixelUnshuffleOptions(scale)),
                              nn::conv2d(torch::nn::Conv2dOptions(
                                  config_.in_channels * scale * scale, c_levels[0], 1))));

    torch::nn::Sequential down;
    for (int64_t i = 0; i < levels; ++i) {
        if (i > 0) {
            down->push_back(nn::conv2d(
                torch::nn::Conv2dOptions(c_levels[i - 1], c_levels[i], 4).stride(2).padding(1)));
        }
        down->push_back(MixingResidualBlock(c_levels[i], c_levels[i] * 4));
    }
    down->push_back(NestedSequential(
        nn::conv2d(
            torch::nn::Conv2dOptions(c_levels.back(), config_.latent_channels, 1).bias(false)),
        torch::nn::BatchNorm2d(config_.latent_channels)));
    down_blocks = register_module("down_blocks", down);

    vquantizer = register_module(
        "vquantizer", VectorQuantizer(config_.num_vq_embeddings, config_.latent_channels));

    torch::nn::Sequential up;
    up->push_back(NestedSequential(
        nn::conv2d(torch::nn::Conv2dOptions(config_.latent_channels, c_levels.back(), 1))));
    for (int64_t i = 0; i < levels; ++i) {
        const int64_t c = c_levels[levels - 1 - i];
        const int64_t repeats = i == 0 ? config_.bottleneck_blocks : 1;
        for (int64_t j = 0; j < repeats; ++j) up->push_back(MixingResidualBlock(c, c * 4));
        if (i < levels - 1) {
            up->push_back(nn::CpuSafeConvTranspose2d(c, c_levels[levels - 2 - i],
                                                     /*kernel_size=*/4, /*stride=*/2,
                                                     /*padding=*/1));
        }
    }
    up_blocks = register_module("up_blocks", up);

    out_block = register_module(
        "out_block",
        torch::nn::Sequential(nn::conv2d(torch::nn::Conv2dOptions(
                                  c_levels[0], config_.out_channels * scale * scale, 1)),
                              torch::nn::PixelShuffle(torch::nn::PixelShuffleOptions(scale))));
}

torch::Tensor PaellaVQModelImpl::encode(const torch::Tensor& image) {
    nn::check_nchw("PaellaVQModel::encode", "image", image, config_.in_channels,
                   module_dtype(*this));
    const int64_t m = static_cast<int64_t>(config_.up_down_scale_factor) << (config_.levels - 1);
    if (image.size(2) % m != 0 || image.size(3) % m != 0)
        throw InvalidArgument(
            "PaellaVQModel::encode: image height and width must be divisible by " +
            std::to_string(m) + ", got " + c10::str(image.sizes()));
    // contiguous(): NCHW order also when the weights are channels-last (a no-op otherwise).
    return down_blocks->forward(in_block->forward(image)).contiguous();
}

torch::Tensor PaellaVQModelImpl::decode(const torch::Tensor& latents, bool force_not_quantize) {
    nn::check_nchw("PaellaVQModel::decode", "latents", latents, config_.latent_channels,
                   module_dtype(*this));
    const torch::Tensor quant =
        force_not_quantize ? latents : vquantizer->forward(latents).quantized;
    return out_block->forward(up_blocks->forward(quant)).contiguous();
}

void PaellaVQModelImpl::set_band_bytes(int64_t bytes) {
    if (bytes < 0)
        throw InvalidArgument("PaellaVQModel::set_band_bytes: bytes must be >= 0, got " +
                              std::to_string(bytes));
    band_bytes_ = bytes;
    for (const auto& m : modules(/*include_self=*/false))
        if (auto* block = dynamic_cast<MixingResidualBlockImpl*>(m.get()))
            block->band_bytes = bytes;
}

torch::Tensor PaellaVQModelImpl::forward(const torch::Tensor& image) {
    return decode(encode(image));
}

PaellaVQModel load_paella_vq(const std::string& dir, const LoadOptions& options) {
    const auto config = PaellaVQConfig::from_file(dir + "/config.json");
    auto model = build_unwritten<PaellaVQModel>(config);
    load_weights(*model, find_weight_files(dir, "diffusion_pytorch_model"), options);
    prepare_module(*model, options);
    return model;
}

}  // namespace wuerstchen
