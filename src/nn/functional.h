#pragma once

// Stateless forms of the layers' arithmetic, shared by the modules.

#include <torch/types.h>

#include <string>

namespace wuerstchen::nn {

// y = x W^T + b for x: [..., in], W: [out, in], b: [out] or undefined -> [..., out].
//
// With a bias, the leading dimensions are folded into one (a view where they allow it) and the
// product runs as one addmm, so the bias is added inside the matrix product (cuBLASLt's bias
// epilogue on CUDA). libtorch's C++ torch::nn::Linear instead runs a matmul and then a separate
// pass over the output to add the bias whenever x has more than two dimensions.
torch::Tensor linear_forward(const torch::Tensor& x, const torch::Tensor& weight,
                             const torch::Tensor& bias);

// "[2, 16, 6, 6] Float", or "undefined": what an input check got.
std::string describe(const torch::Tensor& t);

// Checks a module's 4-D input: defined, [B, channels, H, W] with H, W >= 1 (an empty batch
// gives an empty output), in `dtype` (the module's). Throws InvalidArgument "<where>: <name> must
// be ..." naming what it got.
void check_nchw(const char* where, const char* name, const torch::Tensor& t, int64_t channels,
                torch::ScalarType dtype);

// Checks timestep ratios r: defined, [N] in `dtype` (the model's), where N is `batch` (or 1 when
// `one_for_all`); any N when batch < 0 (a schedule's ratios). Throws InvalidArgument
// "<where>: r must be ..." naming what it got.
void check_ratios(const char* where, const torch::Tensor& r, torch::ScalarType dtype, int64_t batch,
                  bool one_for_all = false);

}  // namespace wuerstchen::nn
