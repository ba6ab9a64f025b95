// Stage B (WuerstchenDiffNeXt): parity with diffusers on the tiny decoder, key names equal to the
// checkpoint, configurations other than the shipped one, and the conditions mapped once per call
// (map_condition) giving the same forward.

#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

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

// The decoder_forward reference's inputs.
struct ForwardInputs {
    torch::Tensor x, r, effnet, clip;
};
ForwardInputs forward_inputs() {
    const auto ref = test::reference("decoder_forward");
    return {test::ref_tensor(ref, "x"), test::ref_tensor(ref, "r"), test::ref_tensor(ref, "effnet"),
            test::ref_tensor(ref, "clip")};
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

TEST(DiffNeXt, ConditionMappedOnceGivesTheSameForward) {
    const std::string dir = test::data_path("tiny-wuerstchen/decoder");
    auto packed_model = load_diffnext(dir);
    auto plain_model = load_diffnext(dir, test::unpacked_load());
    const auto [x, r, effnet, clip] = forward_inputs();
    c10::InferenceMode guard;
    for (const bool packed : {true, false}) {
        const std::string what = packed ? "packed mappers" : "per-block mappers";
        auto& model = packed ? packed_model : plain_model;
        const auto condition = model->map_condition(effnet, clip, x.size(2), x.size(3));
        const size_t attention = test::parameters_named(*model, "kv_mapper.1.weight").size();
        EXPECT_EQ(condition.kv.size(), packed ? attention : 0u) << what;
        EXPECT_EQ(condition.effnet_folded, packed) << what;
        const auto& cfg = model->config();
        ASSERT_EQ(condition.effnet.size(), model->effnet_mapper_list.size()) << what;
        for (size_t i = 0; i < condition.effnet.size(); ++i) {
            ASSERT_EQ(condition.effnet[i].defined(),
                      static_cast<bool>(model->effnet_mapper_list[i]))
                << what << ", mapper " << i;
            // Folded: the resized embeddings, which the blocks' first layers map.
            if (condition.effnet[i].defined())
                EXPECT_EQ(condition.effnet[i].size(1), packed ? cfg.effnet_embd : cfg.c_cond)
                    << what << ", mapper " << i;
        }
        const auto expected = model->forward(x, r, effnet, clip);
        EXPECT_TRUE(test::all_close("decoder forward, " + what + " mapped once",
                                    model->forward(x, r, condition), expected, 0.0));
        // The graph-input form round-trips.
        std::vector<torch::Tensor> copies;
        for (const auto& t : condition.tensors()) copies.push_back(t.clone());
        EXPECT_TRUE(test::all_close("decoder forward, " + what + " from copied tensors",
                                    model->forward(x, r, condition.with_tensors(copies)), expected,
                                    0.0));
        // The pipelines' form on the CPU: each attention block's text keys and values.
        const auto projected =
            model->map_condition(effnet, clip, x.size(2), x.size(3), /*project_kv=*/true);
        ASSERT_EQ(projected.kv.size(), condition.kv.size()) << what;
        for (size_t i = 0; i < projected.kv.size(); ++i)
            EXPECT_EQ(projected.kv[i].size(2), 2 * condition.kv[i].size(2)) << what;
        EXPECT_TRUE(test::all_close(
            "decoder forward, " + what + " with keys and values projected once",
            model->forward(x, r, projected), expected, test::scaled_tol(expected, 1e-6)));
    }
}

// Sets each parameter of `model` named *suffix to f(itself), in place (the layouts stay).
template <class F>
void change_in_place(torch::nn::Module& model, const std::string& suffix, F f) {
    torch::NoGradGuard no_grad;
    for (auto& p : test::parameters_named(model, suffix)) p.copy_(f(p.detach()));
}

// The loader folds each level's effnet mapper (a 1x1 convolution) into the first channelwise
// layer of the residual blocks that read it: the same forward as mapping the embeddings first,
// up to the summation order, for the weights of each call.
TEST(DiffNeXt, FoldedEffnetMappersGiveTheSameForward) {
    const std::string dir = test::data_path("tiny-wuerstchen/decoder");
    auto folded = load_diffnext(dir);
    auto plain = load_diffnext(dir, test::unpacked_load());
    EXPECT_TRUE(folded->fold_effnet_mappers());  // already folded: a no-op
    // References, not a structured binding: a C++17 lambda (below) cannot capture one.
    const ForwardInputs in = forward_inputs();
    const torch::Tensor &x = in.x, &r = in.r, &effnet = in.effnet, &clip = in.clip;
    const int64_t h = x.size(2), w = x.size(3);
    // Each folded layer's weight keeps its values, with effnet_embd spare columns per row.
    const auto& cfg = folded->config();
    const auto layers = test::parameters_named(*folded, "channelwise.0.weight");
    const auto plain_layers = test::parameters_named(*plain, "channelwise.0.weight");
    ASSERT_EQ(layers.size(), plain_layers.size());
    for (size_t i = 0; i < layers.size(); ++i) EXPECT_TRUE(layers[i].equal(plain_layers[i])) << i;
    // The tiny decoder's blocks on levels that inject the embeddings.
    int injecting = 0;
    for (size_t level = 0; level < cfg.blocks.size(); ++level)
        if (cfg.inject_effnet[level]) injecting += 2 * cfg.blocks[level];
    EXPECT_GT(injecting, 0);
    EXPECT_EQ(test::folded_layer_count(*folded, cfg.effnet_embd), injecting);
    EXPECT_EQ(test::folded_layer_count(*plain, cfg.effnet_embd), 0);
    auto expect_same = [&](const std::string& what) {
        c10::InferenceMode guard;
        const auto condition = folded->map_condition(effnet, clip, h, w);
        EXPECT_TRUE(condition.effnet_folded) << what;
        const auto expected = plain->forward(x, r, effnet, clip);
        EXPECT_TRUE(test::all_close("decoder forward, folded effnet mappers " + what,
                                    folded->forward(x, r, condition), expected,
                                    test::scaled_tol(expected, 1e-6)));
    };
    expect_same("as loaded");
    // Any one of the folded tensors changed in place: map_condition maps per level.
    // (down_blocks.1.1 is level 1's first residual block, which reads mapper 1.)
    for (const std::string& name :
         {"down_blocks.1.1.channelwise.0.weight", "down_blocks.1.1.channelwise.0.bias",
          "effnet_mappers.1.weight", "effnet_mappers.1.bias"}) {
        const auto params = folded->named_parameters();
        const auto* p = params.find(name);
        ASSERT_NE(p, nullptr) << name;
        {
            torch::NoGradGuard no_grad;
            torch::Tensor(*p).add_(0.0);  // a write, with the same values
        }
        c10::InferenceMode guard;
        EXPECT_FALSE(folded->map_condition(effnet, clip, h, w).effnet_folded) << name;
        ASSERT_TRUE(folded->fold_effnet_mappers()) << name;
        EXPECT_TRUE(folded->map_condition(effnet, clip, h, w).effnet_folded) << name;
    }
    // Weights changed in place after the fold: map_condition maps per level until they are
    // folded again.
    for (auto* model : {&folded, &plain}) {
        change_in_place(**model, "channelwise.0.weight",
                        [](const torch::Tensor& t) { return t * 0.75 + 0.01; });
        change_in_place(**model, "channelwise.0.bias",
                        [](const torch::Tensor& t) { return t - 0.1; });
        for (auto& mapper : (*model)->effnet_mapper_list)
            if (mapper) {
                torch::NoGradGuard no_grad;
                mapper->weight.mul_(1.5);
                mapper->bias.add_(0.2);
            }
    }
    {
        c10::InferenceMode guard;
        EXPECT_FALSE(folded->map_condition(effnet, clip, h, w).effnet_folded);
    }
    ASSERT_TRUE(folded->fold_effnet_mappers());
    expect_same("after in-place changes, folded again");
}

TEST(DiffNeXt, FoldedConditionNeedsTheFoldItWasMappedFor) {
    auto model = load_diffnext(test::data_path("tiny-wuerstchen/decoder"));
    const auto [x, r, effnet, clip] = forward_inputs();
    c10::InferenceMode guard;
    const auto folded = model->map_condition(effnet, clip, x.size(2), x.size(3));
    ASSERT_TRUE(folded.effnet_folded);
    const auto expected = model->forward(x, r, folded);
    {
        // Copies of the weights (as a move or a LoRA fuse makes) undo the fold.
        c10::InferenceMode off(false);
        torch::NoGradGuard no_grad;
        for (auto& p : test::parameters_named(*model, "channelwise.0.weight"))
            p.set_data(p.detach().clone());
    }
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, folded), InvalidArgument, "map it again");
    const auto mapped = model->map_condition(effnet, clip, x.size(2), x.size(3));
    EXPECT_FALSE(mapped.effnet_folded);
    EXPECT_TRUE(test::all_close("decoder forward, unfolded again", model->forward(x, r, mapped),
                                expected, test::scaled_tol(expected, 1e-6)));
    // A condition of one form with the other's flag is refused by its channel count.
    auto mislabelled = mapped;
    mislabelled.effnet_folded = true;
    EXPECT_TRUE(model->fold_effnet_mappers());
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, mislabelled), InvalidArgument,
                                "map_condition's for x");
}

// A mapped condition is what clip_mapper, the kv_mappers (when packed) and the effnet mappers
// (unless folded) gave: once one of them changes, a forward with it is refused until it is mapped
// again.
TEST(DiffNeXt, ConditionOfChangedMappersIsRefused) {
    const std::string dir = test::data_path("tiny-wuerstchen/decoder");
    const auto [x, r, effnet, clip] = forward_inputs();
    for (const bool packed : {true, false}) {
        const std::string what = packed ? "packed, folded" : "per-block mappers";
        auto model = load_diffnext(dir, packed ? LoadOptions{} : test::unpacked_load());
        c10::InferenceMode guard;
        const auto expected = model->forward(x, r, effnet, clip);
        auto map = [&, &x = x, &effnet = effnet, &clip = clip] {
            return model->map_condition(effnet, clip, x.size(2), x.size(3));
        };
        auto edit = [&](const std::string& suffix) {
            c10::InferenceMode off(false);
            change_in_place(*model, suffix, [](const torch::Tensor& t) { return t; });
        };
        DiffNeXtCondition condition = map();
        ASSERT_EQ(condition.effnet_folded, packed) << what;
        ASSERT_EQ(condition.kv.empty(), !packed) << what;

        edit("embedding.1.weight");  // not a mapper: the condition stays valid
        EXPECT_TRUE(test::all_close("decoder forward after an edit outside the mappers, " + what,
                                    model->forward(x, r, condition), expected, 0.0));
        edit("clip_mapper.weight");
        WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, condition), InvalidArgument,
                                    "mapped by clip_mapper as it was then");
        condition = map();
        EXPECT_TRUE(test::all_close("decoder forward mapped again, " + what,
                                    model->forward(x, r, condition), expected, 0.0));
        if (packed) {
            edit("kv_mapper.1.weight");
            WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, condition), InvalidArgument,
                                        "attention block 0's kv_mapper");
            // Folded, the effnet mappers live on in the blocks' weights: check_condition (what
            // a pipeline runs after a step callback) checks the fold too.
            condition = map();
            edit("effnet_mappers.1.weight");
            WUERSTCHEN_EXPECT_THROW_MSG(model->check_condition(condition), InvalidArgument,
                                        "fold_effnet_mappers");
        } else {
            size_t first = 0;
            while (!model->effnet_mapper_list.at(first)) ++first;
            edit("effnet_mappers." + std::to_string(first) + ".weight");
            WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, condition), InvalidArgument,
                                        "effnet_mappers." + std::to_string(first));
        }
        condition = map();
        EXPECT_TRUE(test::all_close("decoder forward mapped once more, " + what,
                                    model->forward(x, r, condition), expected,
                                    test::scaled_tol(expected, 1e-6)));
    }
}

TEST(DiffNeXt, RejectsAConditionForOtherLatents) {
    auto model = load_diffnext(test::data_path("tiny-wuerstchen/decoder"));
    const auto [x, r, effnet, clip] = forward_inputs();
    const int64_t h = x.size(2), w = x.size(3), m = model->size_multiple();
    c10::InferenceMode guard;
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, model->map_condition(effnet, clip, h + m, w)),
                                InvalidArgument, "map_condition's for x");
    WUERSTCHEN_EXPECT_THROW_MSG(
        model->forward(
            x, r,
            model->map_condition(torch::cat({effnet, effnet}), torch::cat({clip, clip}), h, w)),
        InvalidArgument, "map_condition's for x");
    WUERSTCHEN_EXPECT_THROW_MSG(model->map_condition(effnet, clip, h + 1, w), InvalidArgument,
                                "divisible by " + std::to_string(m));
    // Inputs with no pixels, or in another dtype than the model's.
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, effnet.narrow(2, 0, 0), clip), InvalidArgument,
                                "effnet must be");
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x.narrow(2, 0, 0), r, effnet, clip), InvalidArgument,
                                "x must be", "H, W >= 1");
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x.to(torch::kFloat64), r, effnet, clip),
                                InvalidArgument, "x must be a Float tensor", "Double");
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r.to(torch::kLong), effnet, clip),
                                InvalidArgument, "r must be a Float tensor");
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r.to(torch::kFloat64), effnet, clip),
                                InvalidArgument, "r must be a Float tensor", "Double");
    WUERSTCHEN_EXPECT_THROW_MSG(model->map_timesteps(r.to(torch::kFloat64)), InvalidArgument,
                                "r must be a Float tensor");
    WUERSTCHEN_EXPECT_THROW_MSG(model->map_condition(effnet.to(torch::kFloat64), clip, h, w),
                                InvalidArgument, "effnet must be", "Double");
    WUERSTCHEN_EXPECT_THROW_MSG(model->map_condition(effnet, clip.to(torch::kFloat64), h, w),
                                InvalidArgument, "clip must be");
    WUERSTCHEN_EXPECT_THROW_MSG(model->map_condition(effnet.narrow(1, 0, 1), clip, h, w),
                                InvalidArgument, "effnet must be");
    WUERSTCHEN_EXPECT_THROW_MSG(model->map_condition(effnet, clip.narrow(2, 0, 3), h, w),
                                InvalidArgument, "clip must be");
    // Without text states the attention blocks have nothing to read.
    const auto no_text = model->map_condition(effnet, {}, h, w);
    EXPECT_FALSE(no_text.clip.defined());
    EXPECT_TRUE(no_text.kv.empty());
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, no_text), InvalidArgument, "clip is required");
    auto condition = model->map_condition(effnet, clip, h, w);
    WUERSTCHEN_EXPECT_THROW_MSG(condition.with_tensors({}), InvalidArgument, "0 tensors");
    ASSERT_FALSE(condition.kv.empty());  // packed: one per attention block
    condition.kv.pop_back();
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(x, r, condition), InvalidArgument,
                                "map_condition's for x");
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
    // Mapped once: levels 0 and 2 (down) and their up levels have a mapped embedding each, at
    // their level's size; level 1 none.
    const auto condition = model->map_condition(effnet, clip, x.size(2), x.size(3));
    ASSERT_EQ(condition.effnet.size(), 6u);
    const std::vector<int64_t> level_of = {0, 1, 2, 2, 1, 0};
    for (size_t i = 0; i < 6; ++i) {
        const int64_t level = level_of[i];
        ASSERT_EQ(condition.effnet[i].defined(), level != 1) << i;
        if (level == 1) continue;
        EXPECT_EQ(condition.effnet[i].size(2), x.size(2) / cfg.patch_size >> level) << i;
        EXPECT_EQ(condition.effnet[i].size(3), x.size(3) / cfg.patch_size >> level) << i;
    }
    EXPECT_TRUE(
        test::all_close("other config, mapped once", model->forward(x, r, condition), out, 0.0));
    // Folded: every C block of levels 0 and 2, down and up; up level 0's first block reads
    // [resized embeddings, norm, level skip].
    ASSERT_TRUE(model->fold_effnet_mappers());
    EXPECT_EQ(test::folded_layer_count(*model, cfg.effnet_embd), 2 * (1 + 2));
    const auto folded = model->map_condition(effnet, clip, x.size(2), x.size(3));
    ASSERT_TRUE(folded.effnet_folded);
    for (size_t i = 0; i < 6; ++i)
        if (folded.effnet[i].defined()) EXPECT_EQ(folded.effnet[i].size(1), cfg.effnet_embd) << i;
    EXPECT_TRUE(test::all_close("other config, folded effnet mappers", model->forward(x, r, folded),
                                out, test::scaled_tol(out, 1e-6)));
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
