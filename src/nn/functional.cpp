#include "nn/functional.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "wuerstchen/error.h"

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

std::string describe(const torch::Tensor& t) {
    return t.defined() ? c10::str(t.sizes()) + " " + c10::toString(t.scalar_type())
                       : std::string("undefined");
}

void check_ratios(const char* where, const torch::Tensor& r, torch::ScalarType dtype, int64_t batch,
                  bool one_for_all) {
    const bool sized = batch < 0 || (r.defined() && r.dim() == 1 &&
                                     (r.size(0) == batch || (one_for_all && r.size(0) == 1)));
    if (r.defined() && r.dim() == 1 && r.scalar_type() == dtype && sized) return;
    const std::string n = batch < 0     ? "N"
                          : one_for_all ? std::to_string(batch) + "] or [1"
                                        : std::to_string(batch);
    throw InvalidArgument(std::string(where) + ": r must be a " + c10::toString(dtype) +
                          " tensor [" + n + "], got " + describe(r));
}

void check_nchw(const char* where, const char* name, const torch::Tensor& t, int64_t channels,
                torch::ScalarType dtype) {
    const bool ok = t.defined() && t.dim() == 4 && t.size(1) == channels && t.size(2) >= 1 &&
                    t.size(3) >= 1 && t.scalar_type() == dtype;
    if (ok) return;
    throw InvalidArgument(std::string(where) + ": " + name + " must be a " + c10::toString(dtype) +
                          " tensor [B, " + std::to_string(channels) +
                          ", H, W] with H, W >= 1, got " + describe(t));
}

}  // namespace wuerstchen::nn
