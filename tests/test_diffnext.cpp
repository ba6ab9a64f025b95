// Stage B (WuerstchenDiffNeXt): parity with diffusers on the tiny decoder, key names equal to the
// checkpoint, and configurations other than the shipped one.

#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <set>
#include <string>

#include "test_util.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/error.h"
#include "wuerstchen/safetensors.h"

namespace wuerstchen {
namespace {

std::set<std::string> module_keys(torch::nn::Module& m) {
    std::set<std::string> keys;
    for (const auto& p : m.named_parameters()) keys.insert(p.key());
    for (const auto& b : m.named_buffers()) keys.insert(b.key());
    return keys;
}

TEST(DiffNeXt, KeysEqualCheckpoint) {
    const std::string dir = test::data_path("tiny-wuerstchen/decoder");
    WuerstchenDiffNeXt model(DiffNeXtConfig::from_file(dir + "/config.json"));
    const auto file = SafeTensors::open(dir + "/diffusion_pytorch_model.safetensors");
    const auto file_keys = file.keys();
    EXPECT_EQ(module_keys(*model), std::set<std::string>(file_keys.begin(), file_keys.end()));
}

TEST(DiffNeXt, ForwardMatchesReference) {
    auto model = load_diffnext(test::data_path("tiny-wuerstchen/decoder"));
    const auto ref = test::reference("decoder_forward");
    c10::InferenceMode guard;
    const auto expected = test::ref_tensor(ref, "out");
    const auto out = model->forward(test::ref_tensor(ref, "x"), test::ref_tensor(ref, "r"),
                                    test::ref_tensor(ref, "effnet"), test::ref_tensor(ref, "clip"));
    EXPECT_TRUE(
        test::all_close("decoder_forward out", out, expected, test::scaled_tol(expected, 1e-4)));
}

// Three levels, kernel 5, effnet injected on levels 0 and 2 (not 1), a level whose first block is
// a TimestepBlock, and more repeats: shapes and the registered key layout follow upstream.
TEST(DiffNeXt, OtherConfigBuildsAndRuns) {
    DiffNeXtConfig cfg;
    cfg.c_in = 4;
    cfg.c_out = 4;
    cfg.c_r = 16;
    cfg.patch_size = 2;
    cfg.c_cond = 12;
    cfg.c_hidden = {8, 16, 24};
    cfg.nhead = {-1, 2, 4};
    cfg.blocks = {1, 1, 2};
    cfg.level_config = {"CT", "CTA", "TCA"};
    cfg.inject_effnet = {true, false, true};
    cfg.effnet_embd = 6;
    cfg.clip_embd = 10;
    cfg.kernel_size = 5;
    cfg.dropout = {0.0, 0.0, 0.0};
    WuerstchenDiffNeXt model(cfg);
    model->eval();
    EXPECT_EQ(model->size_multiple(), 8);

    const auto keys = module_keys(*model);
    for (const char* k :
         {"effnet_mappers.0.weight", "effnet_mappers.2.weight", "effnet_mappers.3.weight",
          "effnet_mappers.5.weight", "embedding.1.weight", "clf.1.weight",
          "down_blocks.1.0.1.weight", "down_blocks.2.0.1.weight", "down_blocks.2.1.mapper.weight",
          "down_blocks.2.6.attention.to_q.weight", "up_blocks.0.6.1.weight",
          "up_blocks.1.3.1.weight", "up_blocks.2.1.mapper.weight"})
        EXPECT_TRUE(keys.count(k)) << "missing " << k;
    for (const char* k : {"effnet_mappers.1.weight", "effnet_mappers.4.weight",
                          "up_blocks.2.2.1.weight", "down_blocks.0.0.1.weight"})
        EXPECT_FALSE(keys.count(k)) << "unexpected " << k;

    auto shape_of = [&](const std::string& key) {
        for (const auto& p : model->named_parameters())
            if (p.key() == key) return p.value().sizes().vec();
        return std::vector<int64_t>{};
    };
    // Kernel size 5 on x only; the effnet skip widens the first Linear instead.
    EXPECT_EQ(shape_of("down_blocks.0.0.depthwise.weight"), (std::vector<int64_t>{8, 1, 5, 5}));
    EXPECT_EQ(shape_of("down_blocks.0.0.channelwise.0.weight"), (std::vector<int64_t>{32, 8 + 12}));
    // Up level 1 (middle): its first block takes the level skip (16) and no effnet.
    EXPECT_EQ(shape_of("up_blocks.1.0.channelwise.0.weight"), (std::vector<int64_t>{64, 16 + 16}));
    // Up level 0 (top): level skip 8 + effnet 12.
    EXPECT_EQ(shape_of("up_blocks.2.0.channelwise.0.weight"),
              (std::vector<int64_t>{32, 8 + 8 + 12}));
    // Deepest up level: first block is a T block, the C block gets only the effnet skip.
    EXPECT_EQ(shape_of("up_blocks.0.1.channelwise.0.weight"), (std::vector<int64_t>{96, 24 + 12}));

    c10::InferenceMode guard;
    const auto x = torch::randn({2, 4, 32, 24});
    const auto r = torch::tensor({0.7f, 0.2f});
    const auto effnet = torch::randn({2, 6, 3, 5});
    const auto clip = torch::randn({2, 7, 10});
    const auto out = model->forward(x, r, effnet, clip);
    EXPECT_EQ(out.sizes(), x.sizes());
    EXPECT_TRUE(torch::isfinite(out).all().item<bool>());

    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(torch::randn({2, 4, 36, 24}), r, effnet, clip),
                                InvalidArgument, "divisible by 8");
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, torch::randn({2, 5, 3, 5}), clip),
                                InvalidArgument, "effnet");
}

TEST(DiffNeXt, RejectsBadConfig) {
    DiffNeXtConfig cfg;
    cfg.c_hidden = {8, 16};
    cfg.nhead = {-1, 2};
    cfg.blocks = {1, 1};
    cfg.level_config = {"CT", "CTA"};
    cfg.inject_effnet = {false};
    cfg.dropout = {0.0, 0.0};
    WUERSTCHEN_EXPECT_THROW_MSG(WuerstchenDiffNeXt{cfg}, ConfigError, "inject_effnet");
}

}  // namespace
}  // namespace wuerstchen
