// Reduced precision on the CPU.
//
// bfloat16 runs the whole text-to-image path on the CPU (norms in float32, and float32 fallbacks
// where libtorch 1.13 lacks a CPU bf16 kernel: transposed convolution, replication padding).
// End to end it is not compared with the float32 references: upstream computes the noise ratio
// and r * 10000 of the r-embedding in the model dtype (bf16 spacing at 5000 is 32), so a bf16
// run of diffusers itself lands far from its float32 run with these random-weight models. The
// modules are compared at r = 0, where that product is exact, against float32 (tolerances
// relative to the output scale, from the measured 0.6% decoder / 0.5% VQGAN differences with
// 8-bit mantissas); the pipeline is checked to run, stay finite and repeat itself.
// float16 on the CPU is refused with a clear error on libtorch 1.13 (no half CPU kernels); from
// libtorch 2.2 it runs and is compared with float32 as on CUDA.

#include <c10/core/InferenceMode.h>
#include <torch/version.h>

#include "reference_cases.h"
#include "test_util.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/error.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/paella_vq.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/prior_pipeline.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::data_path;
using test::ref_tensor;
using test::reference;

LoadOptions bf16() {
    LoadOptions o;
    o.dtype = torch::kBFloat16;
    return o;
}

torch::Tensor f32(const torch::Tensor& t) { return t.to(torch::kFloat32); }
torch::Tensor b16(const torch::Tensor& t) { return t.to(torch::kBFloat16); }

TEST(ReducedPrecision, DecoderForwardBf16AtRatioZero) {
    auto d32 = load_diffnext(data_path("tiny-wuerstchen/decoder"));
    auto d16 = load_diffnext(data_path("tiny-wuerstchen/decoder"), bf16());
    const auto& cfg = d32->config();
    const int64_t m = d32->size_multiple();
    auto g = make_generator(3);
    const auto x = torch::randn({2, cfg.c_in, 2 * m, 2 * m}, g);
    const auto r = torch::zeros({2});
    const auto effnet = torch::randn({2, cfg.effnet_embd, 3, 3}, g);
    const auto clip = torch::randn({2, 77, cfg.clip_embd}, g);
    c10::InferenceMode inference;
    const auto expected = d32->forward(x, r, effnet, clip);
    const auto actual = d16->forward(b16(x), b16(r), b16(effnet), b16(clip));
    EXPECT_EQ(actual.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(all_close("cpu bf16 decoder forward, r = 0", f32(actual), expected,
                          test::scaled_tol(expected, 2e-2)));
}

TEST(ReducedPrecision, PriorForwardBf16AtRatioZero) {
    auto p32 = load_prior(data_path("tiny-wuerstchen-prior/prior"));
    auto p16 = load_prior(data_path("tiny-wuerstchen-prior/prior"), bf16());
    const auto& cfg = p32->config();
    auto g = make_generator(5);
    const auto x = torch::randn({2, cfg.c_in, 6, 6}, g);
    const auto r = torch::zeros({2});
    const auto c = torch::randn({2, 77, cfg.c_cond}, g);
    c10::InferenceMode inference;
    const auto expected = p32->forward(x, r, c);
    const auto actual = p16->forward(b16(x), b16(r), b16(c));
    EXPECT_EQ(actual.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(all_close("cpu bf16 prior forward, r = 0", f32(actual), expected,
                          test::scaled_tol(expected, 2e-2)));
}

TEST(ReducedPrecision, VqganDecodeBf16) {
    auto v32 = load_paella_vq(data_path("tiny-wuerstchen/vqgan"));
    auto v16 = load_paella_vq(data_path("tiny-wuerstchen/vqgan"), bf16());
    auto g = make_generator(7);
    const auto latents = torch::randn({2, v32->config().latent_channels, 16, 16}, g);
    c10::InferenceMode inference;
    const auto expected = v32->decode(latents);
    const auto actual = v16->decode(b16(latents));
    EXPECT_EQ(actual.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(all_close("cpu bf16 vqgan decode", f32(actual), expected,
                          test::scaled_tol(expected, 1e-2)));
}

TEST(ReducedPrecision, CombinedBf16OnCpuRunsAndRepeats) {
    auto pipe = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"), bf16());
    const auto a = pipe(test::combined_seed42_options());
    EXPECT_EQ(a.image_embeddings.scalar_type(), torch::kBFloat16);
    EXPECT_EQ(a.images.scalar_type(), torch::kFloat32);
    EXPECT_EQ(a.images.sizes(), (std::vector<int64_t>{1, 3, 256, 384}));
    EXPECT_TRUE(torch::isfinite(f32(a.image_embeddings)).all().item<bool>());
    EXPECT_GE(a.images.min().item<float>(), 0.0f);
    EXPECT_LE(a.images.max().item<float>(), 1.0f);
    const auto b = pipe(test::combined_seed42_options());
    EXPECT_TRUE(torch::equal(a.images, b.images));
    EXPECT_TRUE(torch::equal(a.image_embeddings, b.image_embeddings));
}

constexpr bool kCpuHasHalfKernels =
    TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 2);

TEST(ReducedPrecision, Fp16OnCpuNeedsLibtorch22) {
    if (kCpuHasHalfKernels)
        GTEST_SKIP() << "libtorch " << TORCH_VERSION << " has half-precision CPU kernels";
    LoadOptions o;
    o.dtype = torch::kFloat16;
    WUERSTCHEN_EXPECT_THROW_MSG(PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"), o),
                                InvalidArgument, "PriorPipeline", "fp16 on the CPU", "bf16");
    WUERSTCHEN_EXPECT_THROW_MSG(DecoderPipeline::from_pretrained(data_path("tiny-wuerstchen"), o),
                                InvalidArgument, "DecoderPipeline", "fp16 on the CPU", "bf16");
}

// float16 on the CPU (libtorch 2.2+): the same float16 checks as on CUDA (reference_cases.h), so
// the half-precision path is tested on machines without a GPU.
class CpuFp16 : public ::testing::Test {
protected:
    void SetUp() override {
        if (!kCpuHasHalfKernels)
            GTEST_SKIP() << "libtorch " << TORCH_VERSION
                         << " has no half-precision CPU kernels (2.2+ has); fp16 is refused there";
    }
};

TEST_F(CpuFp16, PriorMatchesFp32) { test::expect_prior_fp16_matches_fp32(LoadOptions{}, "cpu"); }

TEST_F(CpuFp16, DecoderMatchesFp32) {
    test::expect_decoder_fp16_matches_fp32(LoadOptions{}, "cpu");
}

TEST_F(CpuFp16, CombinedReferenceScheduleRuns) {
    test::expect_combined_fp16_runs(LoadOptions{}, "cpu");
}

}  // namespace
}  // namespace wuerstchen
