// UninitializedParameters: the models the loaders build with their parameters unwritten have the
// parameters, shapes, options and (once loaded) values of the ordinary build; the guard is scoped
// to its thread and its lifetime; without it, libtorch's default initialization is untouched.

#include <gtest/gtest.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <sstream>
#include <string>
#include <thread>

#include "nn/blocks.h"
#include "nn/init.h"
#include "test_util.h"
#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/config.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/paella_vq.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/safetensors.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {
namespace {

template <typename Holder, typename Config>
void check_model(const std::string& folder, const std::string& stem,
                 Holder (*load)(const std::string&, const LoadOptions&)) {
    const std::string dir = test::data_path(folder);
    const auto config = Config::from_file(dir + "/config.json");
    Holder ordinary(config);
    Holder unwritten = build_unwritten<Holder>(config);
    test::expect_same_structure(*ordinary, *unwritten);

    // The loader (which builds unwritten) against the ordinary build loaded the same way.
    LoadOptions options;
    options.dtype = torch::kFloat16;
    prepare_module(*ordinary, options);
    load_weights(*ordinary, find_weight_files(dir, stem), options);
    Holder loaded = load(dir, options);
    test::expect_same_values(*ordinary, *loaded);
}

TEST(UninitializedParameters, ScopedNestedAndPerThread) {
    EXPECT_FALSE(UninitializedParameters::active());
    {
        UninitializedParameters outer;
        EXPECT_TRUE(UninitializedParameters::active());
        {
            UninitializedParameters inner;
            EXPECT_TRUE(UninitializedParameters::active());
        }
        EXPECT_TRUE(UninitializedParameters::active());
        bool other_thread = true;
        std::thread([&] { other_thread = UninitializedParameters::active(); }).join();
        EXPECT_FALSE(other_thread);
    }
    EXPECT_FALSE(UninitializedParameters::active());
}

// Outside the guard the library's builders draw exactly what libtorch's constructors draw.
TEST(UninitializedParameters, OrdinaryBuildKeepsLibtorchInitialization) {
    // The same sequence of builds from the same seed: libtorch's modules, then the library's.
    torch::manual_seed(7);
    torch::nn::Linear reference_linear(48, 20);
    torch::nn::Linear reference_lora(48, 20);
    torch::nn::Conv2d reference_conv(torch::nn::Conv2dOptions(6, 8, 3).padding(1));
    torch::nn::ConvTranspose2d reference_up(torch::nn::ConvTranspose2dOptions(8, 4, 2).stride(2));
    torch::nn::Embedding reference_embedding(30, 5);

    torch::manual_seed(7);
    auto linear = nn::linear(48, 20);
    LoraLinear lora(48, 20);
    auto conv = nn::conv2d(torch::nn::Conv2dOptions(6, 8, 3).padding(1));
    nn::CpuSafeConvTranspose2d up(8, 4, /*kernel_size=*/2, /*stride=*/2);
    auto embedding = nn::embedding(30, 5);

    test::expect_same_values(*reference_linear, *linear);
    test::expect_same_values(*reference_lora, *lora);
    test::expect_same_values(*reference_conv, *conv);
    test::expect_same_values(*reference_up, *up);
    test::expect_same_values(*reference_embedding, *embedding);
    EXPECT_GT(reference_linear->weight.abs().max().item<float>(), 0.0f);
}

TEST(UninitializedParameters, BuildersKeepShapesAndOptions) {
    UninitializedParameters unwritten;
    auto lora = LoraLinear(48, 20);
    EXPECT_EQ(lora->weight.sizes(), (std::vector<int64_t>{20, 48}));
    EXPECT_EQ(lora->bias.sizes(), (std::vector<int64_t>{20}));
    EXPECT_EQ(lora->options.in_features(), 48);
    auto no_bias = nn::linear(48, 20, /*bias=*/false);
    EXPECT_FALSE(no_bias->bias.defined());
    auto conv = nn::conv2d(torch::nn::Conv2dOptions(6, 8, 3).padding(1).stride(2));
    EXPECT_EQ(conv->weight.sizes(), (std::vector<int64_t>{8, 6, 3, 3}));
    auto depthwise = nn::conv2d(torch::nn::Conv2dOptions(12, 6, 3).groups(6));
    EXPECT_EQ(depthwise->weight.sizes(), (std::vector<int64_t>{6, 2, 3, 3}));
    auto up = nn::CpuSafeConvTranspose2d(8, 4, /*kernel_size=*/4, /*stride=*/2, /*padding=*/1);
    EXPECT_EQ(up->weight.sizes(), (std::vector<int64_t>{8, 4, 4, 4}));
    auto embedding = nn::embedding(30, 5);
    EXPECT_EQ(embedding->weight.sizes(), (std::vector<int64_t>{30, 5}));

    // Written, they compute what the ordinary modules compute.
    torch::NoGradGuard no_grad;
    torch::manual_seed(3);
    torch::nn::Conv2d reference(torch::nn::Conv2dOptions(6, 8, 3).padding(1).stride(2));
    conv->weight.copy_(reference->weight);
    conv->bias.copy_(reference->bias);
    const auto x = torch::randn({2, 6, 9, 7});
    EXPECT_TRUE(torch::equal(conv->forward(x), reference->forward(x)));
    torch::nn::ConvTranspose2d reference_up(
        torch::nn::ConvTranspose2dOptions(8, 4, 4).stride(2).padding(1));
    up->weight.copy_(reference_up->weight);
    up->bias.copy_(reference_up->bias);
    const auto y = torch::randn({1, 8, 5, 6});
    EXPECT_TRUE(torch::equal(up->forward(y), reference_up->forward(y)));
}

TEST(UninitializedParameters, PriorMatchesTheOrdinaryBuild) {
    check_model<WuerstchenPrior, PriorConfig>("tiny-wuerstchen-prior/prior",
                                              "diffusion_pytorch_model", &load_prior);
}

TEST(UninitializedParameters, DecoderMatchesTheOrdinaryBuild) {
    check_model<WuerstchenDiffNeXt, DiffNeXtConfig>("tiny-wuerstchen/decoder",
                                                    "diffusion_pytorch_model", &load_diffnext);
}

TEST(UninitializedParameters, VqganMatchesTheOrdinaryBuild) {
    check_model<PaellaVQModel, PaellaVQConfig>("tiny-wuerstchen/vqgan", "diffusion_pytorch_model",
                                               &load_paella_vq);
}

TEST(UninitializedParameters, TextEncoderMatchesTheOrdinaryBuild) {
    check_model<CLIPTextModel, CLIPTextConfig>("tiny-wuerstchen/text_encoder", "model",
                                               &load_clip_text_model);
}

// What keeps unwritten values out of a loaded model: a file that lacks a parameter is refused.
TEST(UninitializedParameters, LoadRefusesAFileThatLacksAParameter) {
    const std::string dir = test::make_temp_dir("uninitialized_");
    UninitializedParameters unwritten;
    auto layer = nn::linear(3, 2);
    save_safetensors(dir + "/model.safetensors", {{"weight", torch::zeros({2, 3})}});
    WUERSTCHEN_EXPECT_THROW_MSG(load_weights(*layer, {dir + "/model.safetensors"}, {}), WeightError,
                                "model.safetensors", "missing 'bias'");
    test::remove_tree(dir);
}

}  // namespace
}  // namespace wuerstchen
