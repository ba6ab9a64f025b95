// Stage A (PaellaVQModel): encode, vector quantizer and decode against diffusers on the tiny VQGAN.

#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <set>
#include <string>

#include "test_util.h"
#include "wuerstchen/error.h"
#include "wuerstchen/paella_vq.h"
#include "wuerstchen/safetensors.h"

namespace wuerstchen {
namespace {

class PaellaVQTest : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        model_ = new PaellaVQModel(load_paella_vq(test::data_path("tiny-wuerstchen/vqgan")));
    }
    static void TearDownTestSuite() {
        delete model_;
        model_ = nullptr;
    }
    static PaellaVQModel* model_;
};
PaellaVQModel* PaellaVQTest::model_ = nullptr;

TEST_F(PaellaVQTest, KeysEqualCheckpoint) {
    const auto file = SafeTensors::open(
        test::data_path("tiny-wuerstchen/vqgan/diffusion_pytorch_model.safetensors"));
    std::set<std::string> keys;
    for (const auto& p : (*model_)->named_parameters()) keys.insert(p.key());
    for (const auto& b : (*model_)->named_buffers()) keys.insert(b.key());
    const auto file_keys = file.keys();
    EXPECT_EQ(keys, std::set<std::string>(file_keys.begin(), file_keys.end()));
}

TEST_F(PaellaVQTest, MatchesReference) {
    const auto ref = test::reference("vqgan");
    c10::InferenceMode guard;
    auto& vq = *model_;
    const auto image = test::ref_tensor(ref, "image");

    const auto latents = vq->encode(image);
    const auto exp_latents = test::ref_tensor(ref, "latents");
    EXPECT_TRUE(test::all_close("vqgan latents", latents, exp_latents,
                                test::scaled_tol(exp_latents, 1e-4)));

    // Quantize the reference latents so an encode error cannot flip a code choice.
    const auto quantized = vq->vquantizer->forward(exp_latents).quantized;
    const auto exp_quantized = test::ref_tensor(ref, "quantized");
    EXPECT_TRUE(test::all_close("vqgan quantized", quantized, exp_quantized,
                                test::scaled_tol(exp_quantized, 1e-4)));
    EXPECT_TRUE(test::all_close("vqgan quantized (from own latents)",
                                vq->vquantizer->forward(latents).quantized, exp_quantized,
                                test::scaled_tol(exp_quantized, 1e-4)));

    const auto exp_decoded = test::ref_tensor(ref, "decoded");
    EXPECT_TRUE(test::all_close("vqgan decoded", vq->decode(exp_latents), exp_decoded,
                                test::scaled_tol(exp_decoded, 1e-4)));
    const auto exp_decoded_q = test::ref_tensor(ref, "decoded_quantized");
    EXPECT_TRUE(test::all_close("vqgan decoded_quantized",
                                vq->decode(exp_latents, /*force_not_quantize=*/false),
                                exp_decoded_q, test::scaled_tol(exp_decoded_q, 1e-4)));
    EXPECT_TRUE(test::all_close("vqgan forward (encode + decode)", vq->forward(image), exp_decoded,
                                test::scaled_tol(exp_decoded, 1e-4)));
}

TEST_F(PaellaVQTest, QuantizerPicksNearestCode) {
    c10::InferenceMode guard;
    auto& vq = *model_;
    const auto codebook = vq->vquantizer->embedding->weight;  // [64, 4]
    // Codes 5, 17, 63 placed as the pixels of a [1, 4, 1, 3] map, slightly perturbed.
    const auto picked = torch::tensor({5, 17, 63}, torch::kLong);
    const auto z = (codebook.index_select(0, picked) + 1e-4).t().reshape({1, 4, 1, 3});
    const auto out = vq->vquantizer->forward(z);
    EXPECT_TRUE(torch::equal(out.indices, picked));
    EXPECT_TRUE(test::all_close("quantizer codes", out.quantized,
                                codebook.index_select(0, picked).t().reshape({1, 4, 1, 3}), 1e-6));
}

// Mixing blocks in bands of rows (set_band_bytes): one row per band, a few rows, whole images,
// the whole batch at once and the default give upstream's out-of-place whole-batch form (which
// the blocks take while autograd records, checked here too), within float32 rounding of the
// matrix products.
TEST_F(PaellaVQTest, BandsOfRowsMatchWholeImage) {
    auto& vq = *model_;
    const auto ref = test::reference("vqgan");
    const auto image = test::ref_tensor(ref, "image");
    const auto latents = test::ref_tensor(ref, "latents");
    const auto batch2 = torch::cat({latents, latents.flip({3})});
    ASSERT_EQ(vq->band_bytes(), PaellaVQModelImpl::kDefaultBandBytes);
    torch::Tensor whole_decoded, whole_encoded, whole_batch2;
    {
        // Grad mode on and an input that requires grad: upstream's form, and gradients flow.
        const auto input = latents.clone().requires_grad_();
        whole_decoded = vq->decode(input);
        whole_decoded.sum().backward();
        ASSERT_TRUE(input.grad().defined());
        EXPECT_TRUE(torch::isfinite(input.grad()).all().item<bool>());
        EXPECT_GT(input.grad().abs().sum().item<double>(), 0);
        whole_decoded = whole_decoded.detach();
        whole_encoded = vq->encode(image.clone().requires_grad_()).detach();
        whole_batch2 = vq->decode(batch2.clone().requires_grad_()).detach();
    }
    c10::InferenceMode guard;
    // 1 byte -> one row per band; three rows of the decoder's last block (4 x embed_dim / 2
    // float32 per pixel, width = image width / up_down_scale_factor); 0 -> the whole batch.
    const int64_t last_width = whole_decoded.size(3) / vq->config().up_down_scale_factor;
    const int64_t three_rows = 3 * last_width * 4 * (vq->config().embed_dim / 2) * 4;
    for (const int64_t bytes :
         {int64_t{1}, three_rows, int64_t{0}, PaellaVQModelImpl::kDefaultBandBytes}) {
        vq->set_band_bytes(bytes);
        const std::string what = "bands of " + std::to_string(bytes) + " bytes vs upstream's form";
        EXPECT_TRUE(test::all_close(what + ", decode", vq->decode(latents), whole_decoded, 1e-6));
        EXPECT_TRUE(test::all_close(what + ", encode", vq->encode(image), whole_encoded, 1e-6));
        EXPECT_TRUE(test::all_close(what + ", decode batch 2", vq->decode(batch2), whole_batch2,
                                    1e-6));
    }
    EXPECT_EQ(vq->band_bytes(), PaellaVQModelImpl::kDefaultBandBytes);
    // An empty batch has no bands.
    EXPECT_EQ(vq->decode(latents.narrow(0, 0, 0)).size(0), 0);
    WUERSTCHEN_EXPECT_THROW_MSG(vq->set_band_bytes(-1), InvalidArgument, "bytes");
    EXPECT_EQ(vq->band_bytes(), PaellaVQModelImpl::kDefaultBandBytes);
}

TEST_F(PaellaVQTest, RejectsBadShapes) {
    c10::InferenceMode guard;
    auto& vq = *model_;
    WUERSTCHEN_EXPECT_THROW_MSG(vq->encode(torch::rand({1, 4, 64, 48})), InvalidArgument, "image",
                                "[B, 3, H, W]");
    WUERSTCHEN_EXPECT_THROW_MSG(vq->encode(torch::rand({1, 3, 62, 48})), InvalidArgument,
                                "divisible by 4");
    WUERSTCHEN_EXPECT_THROW_MSG(vq->decode(torch::rand({1, 3, 8, 8})), InvalidArgument, "latents",
                                "[B, 4, H, W]");
    // No pixels, or another dtype than the model's.
    WUERSTCHEN_EXPECT_THROW_MSG(vq->decode(torch::rand({1, 4, 0, 0})), InvalidArgument, "latents",
                                "H, W >= 1");
    WUERSTCHEN_EXPECT_THROW_MSG(vq->encode(torch::rand({1, 3, 0, 0})), InvalidArgument, "image",
                                "H, W >= 1");
    WUERSTCHEN_EXPECT_THROW_MSG(vq->decode(torch::rand({1, 4, 8, 8}, torch::kFloat64)),
                                InvalidArgument, "latents", "Double");
}

}  // namespace
}  // namespace wuerstchen
