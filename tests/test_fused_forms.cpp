// nn::linear_forward (bias inside the matrix product) against libtorch's linear: each case checks
// the value and that the work ran as one product without a bias pass. GlobalResponseNorm's one-pass
// form against upstream's four passes, and its ops.

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "nn/blocks.h"
#include "nn/functional.h"
#include "test_util.h"
#include "wuerstchen/lora.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::count_ops;

const std::vector<std::string> kLinearOps = {"aten::addmm", "aten::mm", "aten::bmm", "aten::add_",
                                             "aten::add"};

TEST(LinearForward, BiasInsideOneProductForAnyRank) {
    torch::manual_seed(3);
    const auto weight = torch::randn({5, 6});
    const auto bias = torch::randn({5});
    const std::vector<std::pair<std::string, torch::Tensor>> inputs = {
        {"2-D", torch::randn({4, 6})},
        {"3-D", torch::randn({2, 3, 6})},
        {"4-D NHWC view of NCHW (not contiguous)",
         torch::randn({2, 6, 3, 4}).permute({0, 2, 3, 1})},
        {"4-D without rows", torch::randn({0, 3, 4, 6})},
    };
    for (const auto& [what, x] : inputs) {
        const auto expected = at::linear(x, weight, bias);
        torch::Tensor out;
        const auto ops = count_ops(kLinearOps, [&] { out = nn::linear_forward(x, weight, bias); });
        EXPECT_EQ(out.sizes(), expected.sizes()) << what;
        if (expected.numel() > 0) EXPECT_TRUE(all_close(what, out, expected, 1e-5));
        EXPECT_EQ(ops.at("aten::addmm"), 1) << what;
        EXPECT_EQ(ops.at("aten::mm") + ops.at("aten::bmm"), 0) << what;
        EXPECT_EQ(ops.at("aten::add_") + ops.at("aten::add"), 0)
            << what << ": a separate bias pass";
    }
    // Without a bias: libtorch's linear, unchanged.
    const auto x = torch::randn({2, 3, 6});
    EXPECT_TRUE(all_close("no bias", nn::linear_forward(x, weight, {}), at::linear(x, weight), 0));
}

TEST(LinearForward, ShapeMismatchIsAnError) {
    const auto weight = torch::randn({5, 6});
    EXPECT_THROW(nn::linear_forward(torch::randn({2, 3, 7}), weight, torch::randn({5})),
                 c10::Error);
}

TEST(LinearForward, LoraLinearAddsItsBiasInTheProduct) {
    // The blocks' Linears (LoraLinear) on NHWC activations: one product, no bias pass (libtorch's
    // torch::nn::Linear runs a matmul and then adds the bias over the whole output).
    torch::manual_seed(5);
    auto layer = make_lora_linear(6, 24);
    const auto x = torch::randn({2, 4, 4, 6});
    c10::InferenceMode guard;
    torch::Tensor out;
    const auto ops = count_ops(kLinearOps, [&] { out = lora_forward(layer, x); });
    EXPECT_TRUE(all_close("LoraLinear", out, at::linear(x, layer->weight, layer->bias), 1e-5));
    EXPECT_EQ(ops.at("aten::addmm"), 1);
    EXPECT_EQ(ops.at("aten::add_") + ops.at("aten::add"), 0);
}

// A GRN over c channels with gamma and beta drawn from `seed` (a fresh one is all zeros).
nn::GlobalResponseNorm random_grn(int64_t c, uint64_t seed) {
    torch::manual_seed(seed);
    nn::GlobalResponseNorm grn(c);
    torch::NoGradGuard no_grad;
    grn->gamma.copy_(torch::randn({1, 1, 1, c}));
    grn->beta.copy_(torch::randn({1, 1, 1, c}));
    return grn;
}

TEST(GlobalResponseNorm, OnePassMatchesUpstreamInFewOps) {
    const int64_t c = 12;
    auto grn = random_grn(c, 7);
    const auto x = torch::randn({2, 5, 6, c});
    c10::InferenceMode guard;
    // Upstream in float64: gamma * (x * Nx) + beta + x, Nx = Gx / (mean_C(Gx) + 1e-6).
    const auto x64 = x.to(torch::kFloat64);
    const auto gx = at::norm(x64, 2, {1, 2}, true);
    const auto nx = gx / (gx.mean({-1}, true) + 1e-6);
    const auto expected = grn->gamma.to(torch::kFloat64) * (x64 * nx) +
                          grn->beta.to(torch::kFloat64) + x64;
    // Ops per call of each kind, as this libtorch records them (some nest a second record).
    const auto scratch = torch::randn({3});
    auto per = [&](const std::string& op, const std::function<void()>& run) {
        return count_ops({op}, run).at(op);
    };
    const int div = per("aten::div", [&] { (void)(scratch / scratch); });
    const int add_ = per("aten::add_", [&] { (void)scratch.clone().add_(1e-6); });
    const int addcmul = per("aten::addcmul", [&] { (void)at::addcmul(scratch, scratch, scratch); });
    torch::Tensor out;
    const auto ops =
        count_ops({"aten::add", "aten::add_", "aten::div", "aten::mul", "aten::addcmul"},
                  [&] { out = grn->forward(x); });
    EXPECT_TRUE(all_close("GRN one pass vs upstream (float64)", out.to(torch::kFloat64), expected,
                          test::scaled_tol(expected, 1e-6)));
    // Besides the norm and the mean, on [B, 1, 1, C] in float32: + eps (in place), then the
    // factor as (d + gamma * Gx) / d; then one pass over x.
    EXPECT_EQ(ops.at("aten::add"), 0);
    EXPECT_EQ(ops.at("aten::add_"), add_);
    EXPECT_EQ(ops.at("aten::div"), div);
    EXPECT_EQ(ops.at("aten::mul"), 0);
    EXPECT_EQ(ops.at("aten::addcmul"), 2 * addcmul);
}

// With autograd recording (a model being trained or probed), the same values and a gradient.
TEST(GlobalResponseNorm, RecordsAutograd) {
    const int64_t c = 6;
    auto grn = random_grn(c, 8);
    const auto x = torch::randn({2, 3, 4, c}).requires_grad_();
    torch::Tensor expected;
    {
        torch::NoGradGuard no_grad;
        expected = grn->forward(x);
    }
    const auto out = grn->forward(x);
    ASSERT_TRUE(out.requires_grad());
    EXPECT_TRUE(all_close("GRN with autograd vs without", out.detach(), expected, 1e-6));
    out.sum().backward();
    ASSERT_TRUE(x.grad().defined());
    ASSERT_TRUE(grn->gamma.grad().defined());
    EXPECT_TRUE(x.grad().isfinite().all().item<bool>());
}

}  // namespace
}  // namespace wuerstchen
