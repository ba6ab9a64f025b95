#pragma once

// libtorch's parameterized modules as the library builds them: with libtorch's default
// initialization, or, while a wuerstchen::UninitializedParameters guard is alive on this thread,
// with the parameters allocated at full size and left unwritten. libtorch's constructors always
// initialize, so the unwritten form is built as a one-channel (one-row) stand-in, which is cheap
// to initialize, and then given the real options and parameters of the real shapes; the module
// object, its type and its parameter names are those of the ordinary form.

#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <cstdint>

namespace wuerstchen::nn {

torch::nn::Linear linear(int64_t in_features, int64_t out_features, bool bias = true);
torch::nn::Conv2d conv2d(const torch::nn::Conv2dOptions& options);
torch::nn::Embedding embedding(int64_t num_embeddings, int64_t embedding_dim);

// For the library's subclasses of libtorch modules, in two steps around the base constructor:
// the options to hand it (the stand-in's while the guard is alive, else `options` itself), then
// finish_* in the constructor's body (puts back the real sizes; a no-op without the guard).
torch::nn::LinearOptions base_options(const torch::nn::LinearOptions& options);
void finish_linear(torch::nn::LinearImpl& module, const torch::nn::LinearOptions& options);
torch::nn::ConvTranspose2dOptions base_options(const torch::nn::ConvTranspose2dOptions& options);
void finish_conv_transpose(torch::nn::ConvTranspose2dImpl& module,
                           const torch::nn::ConvTranspose2dOptions& options);

}  // namespace wuerstchen::nn
