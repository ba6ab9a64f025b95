#include "nn/init.h"

#include <ATen/ATen.h>

#include <vector>

#include "wuerstchen/weights.h"

namespace wuerstchen::nn {

namespace {

bool unwritten() { return UninitializedParameters::active(); }

// Gives a convolution built with in = out = groups channels its real channel counts, and
// parameters of the real shapes (as ConvNdImpl::reset() shapes them), unwritten.
template <size_t D, typename Derived>
void resize_conv(torch::nn::ConvNdImpl<D, Derived>& m, int64_t in, int64_t out) {
    torch::NoGradGuard no_grad;
    m.options.in_channels(in).out_channels(out);
    const int64_t groups = m.options.groups();
    std::vector<int64_t> sizes = m.options.transposed() ? std::vector<int64_t>{in, out / groups}
                                                        : std::vector<int64_t>{out, in / groups};
    const auto& kernel = *m.options.kernel_size();
    sizes.insert(sizes.end(), kernel.begin(), kernel.end());
    m.weight.set_data(at::empty(sizes, m.weight.options()));
    if (m.bias.defined()) m.bias.set_data(at::empty({out}, m.bias.options()));
}

// The cheap stand-in for a convolution's options: groups channels in and out.
template <typename Options>
Options conv_stand_in(Options options) {
    const int64_t groups = options.groups();
    options.in_channels(groups).out_channels(groups);
    return options;
}

}  // namespace

torch::nn::LinearOptions base_options(const torch::nn::LinearOptions& options) {
    if (!unwritten()) return options;
    return torch::nn::LinearOptions(1, 1).bias(options.bias());
}

void finish_linear(torch::nn::LinearImpl& module, const torch::nn::LinearOptions& options) {
    if (!unwritten()) return;
    torch::NoGradGuard no_grad;
    module.options = options;
    const int64_t in = options.in_features(), out = options.out_features();
    module.weight.set_data(at::empty({out, in}, module.weight.options()));
    if (module.bias.defined()) module.bias.set_data(at::empty({out}, module.bias.options()));
}

torch::nn::Linear linear(int64_t in_features, int64_t out_features, bool bias) {
    const auto options = torch::nn::LinearOptions(in_features, out_features).bias(bias);
    torch::nn::Linear module(base_options(options));
    finish_linear(*module, options);
    return module;
}

torch::nn::Conv2d conv2d(const torch::nn::Conv2dOptions& options) {
    if (!unwritten()) return torch::nn::Conv2d(options);
    torch::nn::Conv2d module(conv_stand_in(options));
    resize_conv(*module, options.in_channels(), options.out_channels());
    return module;
}

torch::nn::ConvTranspose2dOptions base_options(const torch::nn::ConvTranspose2dOptions& options) {
    return unwritten() ? conv_stand_in(options) : options;
}

void finish_conv_transpose(torch::nn::ConvTranspose2dImpl& module,
                           const torch::nn::ConvTranspose2dOptions& options) {
    if (unwritten()) resize_conv(module, options.in_channels(), options.out_channels());
}

torch::nn::Embedding embedding(int64_t num_embeddings, int64_t embedding_dim) {
    auto options = torch::nn::EmbeddingOptions(num_embeddings, embedding_dim);
    // libtorch's own way to skip the initialization: the weight given up front.
    if (unwritten()) options._weight(at::empty({num_embeddings, embedding_dim}));
    return torch::nn::Embedding(options);
}

}  // namespace wuerstchen::nn
