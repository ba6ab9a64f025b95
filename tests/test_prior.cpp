// Stage C: the shared blocks and WuerstchenPrior against diffusers (tests/data/references).

#include <c10/core/InferenceMode.h>
#include <torch/version.h>

#include <cmath>
#include <set>
#include <string>

#include "nn/blocks.h"
#include "test_util.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/prior.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::data_path;
using test::ref_tensor;
using test::reference;
using test::scaled_tol;

const std::string kPriorDir = "tiny-wuerstchen-prior/prior";

TEST(Blocks, REmbeddingOddWidthIsZeroPadded) {
    auto r = torch::tensor({0.93f, 0.25f, 0.0f});
    auto even = nn::r_embedding(r, 6);
    auto odd = nn::r_embedding(r, 7);
    ASSERT_EQ(odd.sizes(), (std::vector<int64_t>{3, 7}));
    EXPECT_TRUE(torch::equal(odd.slice(1, 0, 6), even));
    EXPECT_TRUE(torch::equal(odd.select(1, 6), torch::zeros({3})));
    // [sin(0 * f) ; cos(0 * f)] at r = 0.
    EXPECT_TRUE(torch::equal(even[2], torch::tensor({0.f, 0.f, 0.f, 1.f, 1.f, 1.f})));
}

TEST(Blocks, REmbeddingKeepsDtype) {
    auto r = torch::tensor({0.5}, torch::kFloat64);
    EXPECT_EQ(nn::r_embedding(r, 8).scalar_type(), torch::kFloat64);
}

TEST(Blocks, ParameterNamesFollowDiffusers) {
    nn::ResBlock res(8, 8);  // groups = c: c_skip must be a multiple of c
    std::set<std::string> names;
    for (const auto& p : res->named_parameters()) names.insert(p.key());
    EXPECT_EQ(names, (std::set<std::string>{"depthwise.weight", "depthwise.bias",
                                            "channelwise.0.weight", "channelwise.0.bias",
                                            "channelwise.2.gamma", "channelwise.2.beta",
                                            "channelwise.4.weight", "channelwise.4.bias"}));
    EXPECT_EQ(res->depthwise->weight.sizes(), (std::vector<int64_t>{8, 2, 3, 3}));
    nn::AttnBlock attn(8, 6, 2);
    names.clear();
    for (const auto& p : attn->named_parameters()) names.insert(p.key());
    EXPECT_EQ(names, (std::set<std::string>{"attention.to_q.weight", "attention.to_q.bias",
                                            "attention.to_k.weight", "attention.to_k.bias",
                                            "attention.to_v.weight", "attention.to_v.bias",
                                            "attention.to_out.0.weight", "attention.to_out.0.bias",
                                            "kv_mapper.1.weight", "kv_mapper.1.bias"}));
}

// softmax(q k^T / sqrt(dim_head)) v over heads, written out, for x [B, N, C], ctx [B, M, C].
torch::Tensor reference_attention(nn::Attention& attn, const torch::Tensor& x,
                                  const torch::Tensor& ctx) {
    const int64_t b = x.size(0), n = x.size(1), m = ctx.size(1);
    const int64_t heads = attn->heads, d = attn->dim_head;
    auto split = [&](const torch::Tensor& t, int64_t len) {
        return t.view({b, len, heads, d}).permute({0, 2, 1, 3});
    };
    auto q = split(attn->to_q->forward(x), n);
    auto k = split(attn->to_k->forward(ctx), m);
    auto v = split(attn->to_v->forward(ctx), m);
    auto p = torch::softmax(torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(double(d)), -1);
    return attn->to_out->forward(
        torch::matmul(p, v).permute({0, 2, 1, 3}).reshape({b, n, heads * d}));
}

// dim_head 4 has a power-of-two scale (libtorch 1.13's path then scales the queries, which must
// give the same scores bit for bit), dim_head 3 does not.
TEST(Blocks, AttentionIsSoftmaxOverHeads) {
    for (const int64_t dim_head : {4, 3}) {
        nn::Attention attn(2 * dim_head, 2, dim_head);
        auto gen = make_generator(0);
        auto x = randn_like_diffusers({2, 5, 2 * dim_head}, gen);
        auto ctx = randn_like_diffusers({2, 3, 2 * dim_head}, gen);
        c10::InferenceMode guard;
        const auto out = attn->forward(x, ctx);
        const auto expected = reference_attention(attn, x, ctx);
        const std::string what = "attention, dim_head " + std::to_string(dim_head);
        EXPECT_TRUE(all_close(what, out, expected, 1e-6));
#if TORCH_VERSION_MAJOR < 2
        if (dim_head == 4) EXPECT_TRUE(torch::equal(out, expected)) << what;
#endif
    }
}

// With autograd recording (no in-place softmax then), the gradients are the written-out
// attention's.
TEST(Blocks, AttentionRecordsAutograd) {
    nn::Attention attn(8, 2, 4);
    auto gen = make_generator(2);
    auto x = randn_like_diffusers({2, 5, 8}, gen).requires_grad_();
    auto ctx = randn_like_diffusers({2, 3, 8}, gen);
    attn->forward(x, ctx).square().sum().backward();
    const auto grad = x.grad().clone();
    x.grad().zero_();
    reference_attention(attn, x, ctx).square().sum().backward();
    EXPECT_TRUE(all_close("attention input gradient", grad, x.grad(), 1e-5));
    EXPECT_TRUE(attn->to_q->weight.grad().defined());
}

// Enough queries and keys that the float32 scores (4200 x 4100, 69 MB) exceed the 64 MiB that
// libtorch 1.13's path computes at once: the chunked rows equal one softmax over the whole
// matrix (libtorch 2.x takes scaled_dot_product_attention here).
TEST(Blocks, AttentionOverManyQueriesMatchesOneSoftmax) {
    nn::Attention attn(4, 1, 4);
    auto gen = make_generator(1);
    auto x = randn_like_diffusers({1, 4200, 4}, gen);
    auto ctx = randn_like_diffusers({1, 4100, 4}, gen);
    c10::InferenceMode guard;
    EXPECT_TRUE(all_close("attention, 4200 queries", attn->forward(x, ctx),
                          reference_attention(attn, x, ctx), 1e-5));
    // An empty batch has no rows to chunk.
    EXPECT_EQ(attn->forward(x.narrow(0, 0, 0), ctx.narrow(0, 0, 0)).sizes(),
              (std::vector<int64_t>{0, 4200, 4}));
}

TEST(Prior, ParametersAreTheCheckpointKeys) {
    WuerstchenPrior prior(PriorConfig::from_file(data_path(kPriorDir + "/config.json")));
    std::set<std::string> model_keys;
    for (const auto& p : prior->named_parameters()) model_keys.insert(p.key());
    for (const auto& b : prior->named_buffers()) model_keys.insert(b.key());
    auto st = SafeTensors::open(data_path(kPriorDir + "/diffusion_pytorch_model.safetensors"));
    auto keys = st.keys();
    EXPECT_EQ(model_keys, std::set<std::string>(keys.begin(), keys.end()));
}

// The prior_forward reference and its inputs.
struct ForwardInputs {
    SafeTensors ref = reference("prior_forward");
    torch::Tensor x = ref_tensor(ref, "x");
    torch::Tensor r = ref_tensor(ref, "r");
    torch::Tensor c = ref_tensor(ref, "c");
};

TEST(Prior, ForwardMatchesDiffusers) {
    auto prior = load_prior(data_path(kPriorDir));
    const auto [ref, x, r, c] = ForwardInputs();
    auto expected = ref_tensor(ref, "out");
    auto expected_r = ref_tensor(ref, "r_embed");
    c10::InferenceMode guard;
    EXPECT_TRUE(all_close("prior_forward r_embed", prior->gen_r_embedding(r), expected_r,
                          scaled_tol(expected_r, 1e-4)));
    EXPECT_TRUE(all_close("prior_forward out", prior->forward(x, r, c), expected,
                          scaled_tol(expected, 1e-4)));
}

TEST(Prior, ConditionMappedOnceGivesTheSameForward) {
    // A pipeline maps the text condition once per call; each step's forward then reads it.
    const auto [ref, x, r, c] = ForwardInputs();
    auto packed_prior = load_prior(data_path(kPriorDir));
    auto plain_prior = load_prior(data_path(kPriorDir), test::unpacked_load());
    c10::InferenceMode guard;
    for (const bool packed : {true, false}) {
        const std::string what = packed ? "packed mappers" : "per-block mappers";
        auto& prior = packed ? packed_prior : plain_prior;
        const PriorCondition condition = prior->map_condition(c);
        EXPECT_EQ(condition.c_embed.sizes(),
                  (std::vector<int64_t>{c.size(0), c.size(1), prior->config().c}))
            << what;
        EXPECT_EQ(condition.kv.size(), packed ? static_cast<size_t>(prior->config().depth) : 0u)
            << what;
        const auto round_trip = PriorCondition::from_tensors(condition.tensors());
        EXPECT_TRUE(round_trip.c_embed.is_same(condition.c_embed)) << what;
        EXPECT_EQ(round_trip.kv.size(), condition.kv.size()) << what;
        const auto expected = prior->forward(x, r, c);
        EXPECT_TRUE(all_close("prior forward, " + what + " mapped once",
                              prior->forward(x, r, condition), expected, 0.0));
        // The pipelines' form on the CPU: each block's text keys and values, [B, L, 2c].
        const PriorCondition projected = prior->map_condition(c, /*project_kv=*/true);
        ASSERT_EQ(projected.kv.size(), condition.kv.size()) << what;
        for (const auto& kv : projected.kv)
            EXPECT_EQ(kv.sizes(),
                      (std::vector<int64_t>{c.size(0), c.size(1), 2 * prior->config().c}))
                << what;
        EXPECT_TRUE(all_close("prior forward, " + what + " with keys and values projected once",
                              prior->forward(x, r, projected), expected,
                              test::scaled_tol(expected, 1e-6)));
        if (!packed) continue;
        // Keys and values need the source they were projected from: from_tensors (the graphs'
        // form, which never projects) drops it, and a weight changed in place since is noticed.
        EXPECT_THROW(prior->forward(x, r, PriorCondition::from_tensors(projected.tensors())),
                     InvalidArgument)
            << what;
        {
            c10::InferenceMode off(false);
            torch::NoGradGuard no_grad;
            test::parameters_named(*prior, "attention.to_v.bias").back().mul_(1.0);
        }
        EXPECT_THROW(prior->forward(x, r, projected), InvalidArgument) << what;
        EXPECT_TRUE(all_close("prior forward, " + what + " projected again",
                              prior->forward(x, r, prior->map_condition(c, true)), expected,
                              test::scaled_tol(expected, 1e-6)));
    }
}

TEST(Prior, ConditionOfChangedMappersIsRefused) {
    // A mapped condition is cond_mapper's (and, when packed, the kv_mappers') output as they were:
    // once those change, a forward with it would mix old and new weights, so it is refused until
    // mapped again. Changes elsewhere in the model leave it valid.
    const auto [ref, x, r, c] = ForwardInputs();
    auto prior = load_prior(data_path(kPriorDir));
    auto other = load_prior(data_path(kPriorDir));
    c10::InferenceMode guard;
    const auto expected = prior->forward(x, r, c);
    auto edit = [](const torch::Tensor& t) {
        c10::InferenceMode off(false);
        torch::NoGradGuard no_grad;
        torch::Tensor(t).mul_(1.0);  // same values, a new version
    };
    auto cond_linear = std::dynamic_pointer_cast<LoraLinearImpl>(prior->cond_mapper[0]);
    ASSERT_TRUE(cond_linear);

    PriorCondition condition = prior->map_condition(c);
    ASSERT_FALSE(condition.kv.empty());  // packed: the kv_mappers are part of the source
    edit(test::parameters_named(*prior, "blocks.0.channelwise.0.weight").at(0));
    EXPECT_TRUE(all_close("prior forward after an edit outside the mappers",
                          prior->forward(x, r, condition), expected, 0.0));

    edit(cond_linear->weight);
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, condition), InvalidArgument,
                                "mapped by cond_mapper as it was then");
    condition = prior->map_condition(c);
    EXPECT_TRUE(
        all_close("prior forward mapped again", prior->forward(x, r, condition), expected, 0.0));

    edit(test::parameters_named(*prior, "kv_mapper.1.bias").back());
    WUERSTCHEN_EXPECT_THROW_MSG(
        prior->forward(x, r, condition), InvalidArgument,
        "attention block " + std::to_string(prior->config().depth - 1) + "'s kv_mapper");
    condition = prior->map_condition(c);

    // LoRA state: an adapter added, switched off, rescaled.
    const int64_t in = cond_linear->weight.size(1), out = cond_linear->weight.size(0);
    {
        c10::InferenceMode off(false);
        cond_linear->add_adapter("style", torch::randn({2, in}), torch::randn({out, 2}), 2.0);
    }
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, condition), InvalidArgument, "cond_mapper");
    condition = prior->map_condition(c);
    const auto with_lora = prior->forward(x, r, condition);
    EXPECT_FALSE(torch::allclose(with_lora, expected));
    cond_linear->adapter("style").weight = 0.5;
    EXPECT_THROW(prior->forward(x, r, condition), InvalidArgument);
    condition = prior->map_condition(c);
    edit(cond_linear->adapter("style").up);  // an adapter's tensor changed in place
    EXPECT_THROW(prior->forward(x, r, condition), InvalidArgument);
    condition = prior->map_condition(c);
    {
        // Another adapter of the same name and scale: not the one mapped with.
        c10::InferenceMode off(false);
        cond_linear->delete_adapter("style");
        cond_linear->add_adapter("style", torch::randn({2, in}), torch::randn({out, 2}), 2.0, 0.5);
    }
    EXPECT_THROW(prior->forward(x, r, condition), InvalidArgument);
    condition = prior->map_condition(c);
    cond_linear->set_lora_enabled(false);
    EXPECT_THROW(prior->forward(x, r, condition), InvalidArgument);
    condition = prior->map_condition(c);
    EXPECT_TRUE(all_close("prior forward, LoRA switched off and mapped again",
                          prior->forward(x, r, condition), expected, 0.0));

    // Another model's condition (same config and values, other tensors) is not this one's.
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, other->map_condition(c)), InvalidArgument,
                                "cond_mapper");
    // Without a source (made from tensors) nothing is checked: the caller vouches for it.
    EXPECT_TRUE(all_close("prior forward, condition without a source",
                          other->forward(x, r, PriorCondition::from_tensors(condition.tensors())),
                          expected, 0.0));
}

TEST(Prior, RejectsAConditionOfAnotherShape) {
    auto prior = load_prior(data_path(kPriorDir));
    const auto [ref, x, r, c] = ForwardInputs();
    c10::InferenceMode guard;
    WUERSTCHEN_EXPECT_THROW_MSG(prior->map_condition(c.narrow(2, 0, 3)), InvalidArgument,
                                "c must be [B, L, " + std::to_string(prior->config().c_cond));
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, c.narrow(2, 0, 3)), InvalidArgument,
                                "c must be");
    // A condition mapped for another batch size (twice x's is guidance pairs), or missing
    // blocks.
    const auto condition = prior->map_condition(torch::cat({c, c, c}));
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, condition), InvalidArgument,
                                "map_condition's for a batch of " + std::to_string(x.size(0)));
    PriorCondition short_of_blocks = prior->map_condition(c);
    short_of_blocks.kv.pop_back();
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, short_of_blocks), InvalidArgument,
                                "map_condition's");
    // A hand-made condition of another width, or in another dtype.
    PriorCondition narrow = prior->map_condition(c);
    narrow.kv.back() = narrow.kv.back().narrow(2, 0, 3);
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, narrow), InvalidArgument, "map_condition's");
    PriorCondition wide = prior->map_condition(c);
    wide.c_embed = torch::cat({wide.c_embed, wide.c_embed}, 2);
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, wide), InvalidArgument, "map_condition's");
    PriorCondition doubles = prior->map_condition(c);
    for (auto& kv : doubles.kv) kv = kv.to(torch::kFloat64);
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, r, doubles), InvalidArgument, "dtype");
}

// x and r as the prior takes them: 4-D latents with pixels in the model's dtype, r per sample
// or one for all.
TEST(Prior, RejectsBadLatentsAndRatios) {
    auto prior = load_prior(data_path(kPriorDir));
    const auto [ref, x, r, c] = ForwardInputs();
    c10::InferenceMode guard;
    const auto condition = prior->map_condition(c);
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x.narrow(3, 0, 0), r, condition), InvalidArgument,
                                "x must be", "H, W >= 1");
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x.to(torch::kFloat64), r, condition),
                                InvalidArgument, "x must be a Float tensor", "Double");
    for (const auto& bad_r :
         {torch::ones({x.size(0) + 1}), torch::tensor(0.5), torch::ones({1, 1}), torch::Tensor(),
          torch::ones({1}, torch::kLong), torch::ones({1}, torch::kFloat64)})
        WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, bad_r, condition), InvalidArgument,
                                    "r must be a Float tensor");
    WUERSTCHEN_EXPECT_THROW_MSG(prior->map_timesteps(r.to(torch::kFloat64)), InvalidArgument,
                                "r must be a Float tensor");
    WUERSTCHEN_EXPECT_THROW_MSG(prior->map_condition(c.to(torch::kFloat64)), InvalidArgument,
                                "c must be", "Double");
    // One ratio for the whole batch is upstream's broadcast.
    EXPECT_NO_THROW(prior->forward(x, r.narrow(0, 0, 1), condition));
}

// A condition for twice x's batch ([text ; uncond], as the pipeline's guidance maps it) takes x
// (and r) for both halves, running the blocks before the first attention block once: the same
// as the forward of [x ; x], up to the rounding of products over fewer rows.
TEST(Prior, GuidancePairsRunTheFirstBlocksOnce) {
    auto prior = load_prior(data_path(kPriorDir));
    const auto [ref, x, r, c] = ForwardInputs();
    c10::InferenceMode guard;
    const auto text = c, uncond = c.flip(0) * 0.5;  // any second condition
    for (int64_t batch : {2, 1}) {
        const auto xb = x.narrow(0, 0, batch), rb = r.narrow(0, 0, batch);
        const auto condition = prior->map_condition(
            torch::cat({text.narrow(0, 0, batch), uncond.narrow(0, 0, batch)}));
        const auto expected = prior->forward(torch::cat({xb, xb}), torch::cat({rb, rb}), condition);
        const std::string what = "batch " + std::to_string(batch) + " pairs";
        EXPECT_TRUE(all_close(what + ", r", prior->forward(xb, rb, condition), expected,
                              scaled_tol(expected, 1e-5)));
        const auto rows = prior->map_timesteps(rb);
        ASSERT_TRUE(rows.defined());
        EXPECT_TRUE(all_close(what + ", mapped timesteps", prior->forward(xb, rows, condition),
                              expected, scaled_tol(expected, 1e-5)));
        EXPECT_TRUE(
            all_close(what + ", one row", prior->forward(xb, rows.row(0), condition),
                      prior->forward(torch::cat({xb, xb}), rb[0].expand({2 * batch}), condition),
                      scaled_tol(expected, 1e-5)));
    }
    // Unpacked (as offloaded), each block maps r itself: r for the batch, or one ratio for all.
    auto unpacked = load_prior(data_path(kPriorDir), test::unpacked_load());
    const auto condition = unpacked->map_condition(torch::cat({text, uncond}));
    const auto expected = unpacked->forward(torch::cat({x, x}), torch::cat({r, r}), condition);
    EXPECT_TRUE(all_close("unpacked pairs, r", unpacked->forward(x, r, condition), expected,
                          scaled_tol(expected, 1e-5)));
    const auto one = r.narrow(0, 0, 1);
    const auto expected_one = unpacked->forward(torch::cat({x, x}), one, condition);
    EXPECT_TRUE(all_close("unpacked pairs, one ratio", unpacked->forward(x, one, condition),
                          expected_one, scaled_tol(expected_one, 1e-5)));
}

TEST(Prior, LoadNamesTheMissingConfig) {
    WUERSTCHEN_EXPECT_THROW_MSG(load_prior(data_path("no-such-folder")), Error, "no-such-folder");
}

}  // namespace
}  // namespace wuerstchen
