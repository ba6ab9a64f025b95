#include <torch/nn/module.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "test_util.h"
#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"

namespace wuerstchen {
namespace {

constexpr double kTol = 1e-4;

void check_reference(const std::string& folder, const std::string& reference, int expected_layers) {
    auto model = load_clip_text_model(test::data_path(folder), LoadOptions{});
    const auto ref = test::reference(reference);
    const auto ids = test::ref_tensor(ref, "input_ids");
    const auto mask = test::ref_tensor(ref, "attention_mask");

    torch::NoGradGuard no_grad;
    const auto out = model->forward(ids, mask, /*output_hidden_states=*/true);
    ASSERT_EQ(out.hidden_states.size(), static_cast<size_t>(expected_layers + 1));
    // The reference's hidden_states_1 is transformers' hidden_states[1]: the output of the first
    // encoder layer (hidden_states[0] is the embeddings output, checked below).
    EXPECT_TRUE(test::all_close(reference + " hidden_states[1]", out.hidden_states[1],
                                test::ref_tensor(ref, "hidden_states_1"), kTol));
    EXPECT_TRUE(test::all_close(reference + " last_hidden_state", out.last_hidden_state,
                                test::ref_tensor(ref, "last_hidden_state"), kTol));
    EXPECT_TRUE(test::all_close(reference + " pooler_output", out.pooler_output,
                                test::ref_tensor(ref, "pooler_output"), kTol));

    const auto params = model->named_parameters();
    const auto embeddings = torch::embedding(params["embeddings.token_embedding.weight"], ids) +
                            params["embeddings.position_embedding.weight"].slice(0, 0, ids.size(1));
    EXPECT_TRUE(test::all_close(reference + " embeddings", out.hidden_states[0], embeddings, 1e-6));

    // Without hidden states the outputs are the same and the list stays empty.
    const auto plain = model->forward(ids, mask);
    EXPECT_TRUE(plain.hidden_states.empty());
    EXPECT_TRUE(torch::equal(plain.last_hidden_state, out.last_hidden_state));
}

TEST(CLIPTextModel, PriorTextEncoderMatchesTransformers) {
    check_reference("tiny-wuerstchen-prior/text_encoder", "text_encoder_prior", 2);  // gelu
}

TEST(CLIPTextModel, DecoderTextEncoderMatchesTransformers) {
    check_reference("tiny-wuerstchen/text_encoder", "text_encoder_decoder", 2);  // quick_gelu
}

TEST(CLIPTextModel, BFloat16FollowsFloat32) {
    LoadOptions options;
    options.dtype = torch::kBFloat16;
    auto model = load_clip_text_model(test::data_path("tiny-wuerstchen/text_encoder"), options);
    const auto ref = test::reference("text_encoder_decoder");
    torch::NoGradGuard no_grad;
    const auto out =
        model->forward(test::ref_tensor(ref, "input_ids"), test::ref_tensor(ref, "attention_mask"));
    EXPECT_EQ(out.last_hidden_state.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(test::all_close("bf16 last_hidden_state", out.last_hidden_state.to(torch::kFloat32),
                                test::ref_tensor(ref, "last_hidden_state"), 0.1));
}

TEST(CLIPTextModel, ParameterNamesAreTransformersKeys) {
    const std::string dir = test::data_path("tiny-wuerstchen-prior/text_encoder");
    CLIPTextModel model(CLIPTextConfig::from_file(dir + "/config.json"));
    std::set<std::string> names;
    for (const auto& p : model->named_parameters()) names.insert(p.key());
    const auto file = SafeTensors::open(dir + "/model.safetensors");
    const auto keys = file.keys();
    EXPECT_EQ(names, std::set<std::string>(keys.begin(), keys.end()));
    EXPECT_TRUE(names.count("encoder.layers.1.self_attn.out_proj.weight"));
    EXPECT_TRUE(names.count("embeddings.position_embedding.weight"));
}

TEST(CLIPTextModel, PackedProjectionsGiveTheSameStatesInFewerProducts) {
    // The loader packs each layer's q, k and v projections unless offloading; the layer then
    // projects in one matrix product instead of three, with the same values.
    for (const std::string folder :
         {"tiny-wuerstchen-prior/text_encoder", "tiny-wuerstchen/text_encoder"}) {
        auto packed = load_clip_text_model(test::data_path(folder), LoadOptions{});
        auto plain = load_clip_text_model(test::data_path(folder), test::unpacked_load());
        const int64_t layers = packed->config().num_hidden_layers;
        const auto layout = test::attention_projection_layout(*packed, test::kClipProjections);
        EXPECT_EQ(layout.attention, layers) << folder;
        EXPECT_EQ(layout.packed, layout.attention) << folder;
        EXPECT_EQ(test::attention_projection_layout(*plain, test::kClipProjections).packed, 0)
            << folder;
        test::expect_same_values(*packed, *plain);

        const auto ids = torch::randint(0, packed->config().vocab_size, {2, 9});
        auto mask = torch::ones({2, 9}, torch::kInt64);
        mask[1].narrow(0, 6, 3).fill_(0);
        torch::NoGradGuard no_grad;
        CLIPTextOutput a, b;
        const std::vector<std::string> products = {"aten::mm", "aten::addmm"};
        const auto packed_ops = test::count_ops(products, [&] { a = packed->forward(ids, mask); });
        const auto plain_ops = test::count_ops(products, [&] { b = plain->forward(ids, mask); });
        // One product over 3D columns may block the sums differently from three over D each.
        EXPECT_TRUE(test::all_close(folder + " packed vs per projection", a.last_hidden_state,
                                    b.last_hidden_state,
                                    test::scaled_tol(b.last_hidden_state, 1e-6)));
        EXPECT_TRUE(test::all_close(folder + " pooled", a.pooler_output, b.pooler_output,
                                    test::scaled_tol(b.pooler_output, 1e-6)));
        const auto total = [&](const std::map<std::string, int>& counts) {
            return counts.at("aten::mm") + counts.at("aten::addmm");
        };
        EXPECT_EQ(total(plain_ops) - total(packed_ops), 2 * layers) << folder;
    }
}

TEST(CLIPTextModel, PoolerTakesFirstEos) {
    auto model =
        load_clip_text_model(test::data_path("tiny-wuerstchen/text_encoder"), LoadOptions{});
    const int64_t eos = model->config().eos_token_id;
    // eos at position 2, then padding with eos as well (the decoder tokenizer pads with eos).
    const auto ids = torch::tensor({int64_t{623}, int64_t{71}, eos, eos, eos}).view({1, 5});
    const auto mask =
        torch::tensor({int64_t{1}, int64_t{1}, int64_t{1}, int64_t{0}, int64_t{0}}).view({1, 5});
    torch::NoGradGuard no_grad;
    const auto out = model->forward(ids, mask);
    EXPECT_TRUE(torch::equal(out.pooler_output[0], out.last_hidden_state[0][2]));
    // Causal attention: the prefix does not depend on what follows it.
    const auto no_mask = model->forward(ids);
    EXPECT_TRUE(test::all_close("causal prefix", no_mask.last_hidden_state.slice(1, 0, 3),
                                out.last_hidden_state.slice(1, 0, 3), 1e-6));
}

TEST(CLIPTextModel, LeftPaddingStaysFiniteAndHidden) {
    auto model =
        load_clip_text_model(test::data_path("tiny-wuerstchen/text_encoder"), LoadOptions{});
    const int64_t eos = model->config().eos_token_id;
    // Two padded positions in front: their queries have no visible key.
    const auto mask =
        torch::tensor({int64_t{0}, int64_t{0}, int64_t{1}, int64_t{1}, int64_t{1}}).view({1, 5});
    const auto ids = torch::tensor({int64_t{5}, int64_t{9}, int64_t{623}, int64_t{71}, eos});
    torch::NoGradGuard no_grad;
    const auto out = model->forward(ids.view({1, 5}), mask).last_hidden_state;
    EXPECT_TRUE(out.isfinite().all().item<bool>());
    // Other ids at the padded positions change nothing after them: those keys stay hidden.
    auto other = ids.clone();
    other[0] = 17;
    other[1] = 3;
    const auto changed = model->forward(other.view({1, 5}), mask).last_hidden_state;
    EXPECT_TRUE(
        test::all_close("left padding hidden", changed.slice(1, 2, 5), out.slice(1, 2, 5), 1e-6));
}

TEST(CLIPTextModel, RejectsBadInputsAndConfig) {
    CLIPTextConfig config;
    config.vocab_size = 10;
    config.hidden_size = 8;
    config.intermediate_size = 16;
    config.num_hidden_layers = 1;
    config.num_attention_heads = 2;
    config.max_position_embeddings = 4;
    CLIPTextModel model(config);
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(torch::zeros({1, 5}, torch::kInt64)),
                                InvalidArgument, "max_position_embeddings");
    // Ids outside the vocabulary, no tokens, or ids that are not integers.
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(torch::tensor({{1, 10}}, torch::kInt64)),
                                InvalidArgument, "token id 10", "[0, 10)");
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(torch::tensor({{-1, 2}}, torch::kInt64)),
                                InvalidArgument, "token id -1");
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(torch::zeros({1, 0}, torch::kInt64)),
                                InvalidArgument, "no tokens");
    WUERSTCHEN_EXPECT_THROW_MSG(model->forward(torch::zeros({1, 3}, torch::kFloat32)),
                                InvalidArgument, "integer", "Float");
    EXPECT_NO_THROW(model->forward(torch::tensor({{0, 9, 3}}, torch::kInt32)));
    config.hidden_act = "swish_the_fish";
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTextModel{config}, ConfigError, "hidden_act", "swish_the_fish");
}

}  // namespace
}  // namespace wuerstchen
