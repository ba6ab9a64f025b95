// Block and scheduler arithmetic that only CUDA runs (label gpu; skipped without CUDA).
//
// The scheduler's step plan (every step's timestep factors made at once) gives the per-step
// form's values bit for bit on CUDA: each element runs the same float32 ops.
//
// GlobalResponseNorm in half precision on CUDA: one pass, beta + x * f with the factor
// f = 1 + gamma * s rounded to half first. Checked against the same sum in float64 from the same
// half-precision inputs: within the factor's rounding (2^-11 |x f|) plus the output's
// (2^-11 |result|), per element.

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cmath>
#include <iostream>

#include "nn/blocks.h"
#include "wuerstchen/scheduler.h"

namespace wuerstchen {
namespace {

TEST(GpuBlocks, GlobalResponseNormHalfWithinRounding) {
    if (!torch::cuda::is_available())
        GTEST_SKIP() << "CUDA is not available: GPU block test skipped";
    torch::manual_seed(13);
    const int64_t c = 96;
    nn::GlobalResponseNorm grn(c);
    {
        torch::NoGradGuard no_grad;
        grn->gamma.copy_(torch::randn({1, 1, 1, c}) * 0.1);
        grn->beta.copy_(torch::randn({1, 1, 1, c}));
    }
    grn->to(torch::Device(torch::kCUDA), torch::kHalf);
    const auto x = torch::randn({2, 5, 7, c}).to(torch::Device(torch::kCUDA), torch::kHalf);
    c10::InferenceMode guard;
    const auto out = grn->forward(x);
    ASSERT_EQ(out.scalar_type(), torch::kHalf);
    ASSERT_EQ(out.sizes(), x.sizes());
    // The factor's inputs as the module makes them (half-precision norm and scale), the rest
    // in float64.
    const auto agg = at::norm(x, 2, {1, 2}, true);
    const auto scale = (grn->gamma * (agg / (agg.mean({-1}, true) + 1e-6))).to(torch::kFloat64);
    const auto x64 = x.to(torch::kFloat64);
    const auto exact = grn->beta.to(torch::kFloat64) + x64 * (scale + 1);
    const double half_eps = std::ldexp(1.0, -11);
    const auto bound = half_eps * ((x64 * (scale + 1)).abs() + exact.abs()) + std::ldexp(1.0, -24);
    const double worst = ((out.to(torch::kFloat64) - exact).abs() / bound).max().item<double>();
    std::cout << "GRN half on CUDA vs float64: max error " << worst
              << " of the rounding bound (factor + output)\n";
    EXPECT_LE(worst, 1.001);  // second-order terms
}

TEST(GpuScheduler, StepPlanBitForBit) {
    if (!torch::cuda::is_available())
        GTEST_SKIP() << "CUDA is not available: GPU scheduler test skipped";
    const torch::Device cuda(torch::kCUDA);
    torch::manual_seed(5);
    c10::InferenceMode guard;
    for (const auto dtype : {torch::kFloat32, torch::kHalf}) {
        DDPMWuerstchenScheduler sched;
        sched.set_timesteps(kDefaultStageCTimesteps);
        const auto plan = sched.plan_steps(dtype, cuda);
        const auto sample = torch::randn({2, 16, 24, 24}).to(cuda, dtype);
        const auto model_output = torch::randn({2, 16, 24, 24}).to(cuda, dtype);
        for (int i = 0; i < plan.steps(); ++i) {
            const float t = sched.timestep_values()[static_cast<size_t>(i)];
            const auto noise = torch::randn({2, 16, 24, 24}).to(cuda, dtype);
            EXPECT_TRUE(
                torch::equal(plan.timestep(i, 2),
                             torch::full({2}, t, torch::TensorOptions().device(cuda)).to(dtype)))
                << "step " << i;
            EXPECT_TRUE(torch::equal(sched.step(model_output, plan, i, sample, noise),
                                     sched.step(model_output, t, sample, noise)))
                << c10::toString(dtype) << " step " << i;
        }
    }
}

}  // namespace
}  // namespace wuerstchen
