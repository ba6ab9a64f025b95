#include "nn/functional.h"

#include <ATen/ATen.h>

#include <vector>

namespace wuerstchen::nn {

torch::Tensor linear_forward(const torch::Tensor& x, const torch::Tensor& weight,
                             const torch::Tensor& bias) {
    if (!bias.defined() || x.dim() < 2 || weight.dim() != 2 || x.size(-1) == 0)
        return at::linear(x, weight, bias);
    if (x.dim() == 2) return at::addmm(bias, x, weight.t());
    // [..., in] -> [rows, in], the row count spelled out (x may have no elements). A mismatched
    // `in` reaches addmm, whose error names both shapes.
    const int64_t in = x.size(-1);
    std::vector<int64_t> out_sizes = x.sizes().vec();
    out_sizes.back() = weight.size(0);
    return at::addmm(bias, x.reshape({x.numel() / in, in}), weight.t()).view(out_sizes);
}

}  // namespace wuerstchen::nn
