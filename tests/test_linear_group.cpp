// LinearGroup and the models' pack_condition_mappers and pack_attention_projections: packed layers
// keep their parameters (names, shapes, values), one product over the packed buffers gives each
// layer's own output, anything that replaces a packed weight makes the group decline (so the
// caller maps per layer), split() and add_one_to_scales() work per run of equally wide layers, an
// attention block projects q, k and v in one product, and the prior and decoder compute the same
// with and without packing.

#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>
#include <torch/nn/modules/linear.h>

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "nn/blocks.h"
#include "nn/linear_group.h"
#include "test_util.h"
#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/paella_vq.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/prior_pipeline.h"
#include "wuerstchen/scheduler.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::count_ops;

// LoRA-capable layers of one input size, as the blocks hold them (by default three, of widths 5,
// 3 and 8, input 6).
struct Layers {
    explicit Layers(const std::vector<int64_t>& widths = {5, 3, 8}, int64_t in = 6,
                    uint64_t seed = 7) {
        torch::manual_seed(seed);
        for (int64_t out : widths) layers.push_back(make_lora_linear(in, out));
    }
    std::vector<torch::nn::LinearImpl*> raw() const {
        std::vector<torch::nn::LinearImpl*> out;
        for (const auto& l : layers) out.push_back(l.ptr().get());
        return out;
    }
    // Each layer's own forward, joined along the last dimension.
    torch::Tensor separate(const torch::Tensor& x) const {
        std::vector<torch::Tensor> parts;
        for (const auto& l : layers) parts.push_back(lora_forward(l, x));
        return torch::cat(parts, -1);
    }
    std::vector<torch::nn::Linear> layers;
};

TEST(LinearGroup, PackKeepsParametersAndComputesEachLayer) {
    Layers l;
    std::vector<torch::Tensor> before;
    for (const auto& layer : l.layers)
        for (const auto& p : layer->parameters()) before.push_back(p.detach().clone());
    const auto x = torch::randn({2, 4, 6});
    const auto expected = l.separate(x);

    nn::LinearGroup group(l.raw());
    EXPECT_EQ(group.size(), 3u);
    EXPECT_EQ(group.total_out(), 16);
    EXPECT_EQ(group.offset(1), 5);
    EXPECT_EQ(group.out_features(2), 8);
    torch::NoGradGuard no_grad;
    EXPECT_FALSE(group.ready(torch::kCPU));
    ASSERT_TRUE(group.pack());
    EXPECT_TRUE(group.ready(torch::kCPU));
    EXPECT_TRUE(group.pack());  // already packed: nothing to do

    // Same values and shapes, now rows of one buffer: layer i starts offset(i) rows in.
    size_t k = 0;
    for (const auto& layer : l.layers)
        for (const auto& p : layer->parameters()) EXPECT_TRUE(torch::equal(p, before[k++]));
    const auto& w0 = l.layers[0]->weight;
    for (size_t i = 0; i < l.layers.size(); ++i) {
        EXPECT_TRUE(l.layers[i]->weight.is_alias_of(w0));
        EXPECT_EQ(l.layers[i]->weight.data_ptr<float>(),
                  w0.data_ptr<float>() + group.offset(i) * 6);
        EXPECT_EQ(l.layers[i]->bias.data_ptr<float>(),
                  l.layers[0]->bias.data_ptr<float>() + group.offset(i));
    }
    // One product for all; each layer's own forward still reads its rows.
    EXPECT_TRUE(all_close("packed group vs separate layers", group.forward(x), expected, 1e-6));
    EXPECT_TRUE(all_close("separate layers after packing", l.separate(x), expected, 0.0));
}

TEST(LinearGroup, SplitGivesEachLayerContiguous) {
    // Widths 4, 4, 7, 4: runs of equal width are copied together.
    const Layers l({4, 4, 7, 4}, 6, 9);
    nn::LinearGroup group(l.raw());
    const std::vector<std::pair<size_t, size_t>> runs = {{0, 2}, {2, 1}, {3, 1}};
    EXPECT_EQ(group.equal_width_runs(), runs);
    torch::NoGradGuard no_grad;
    ASSERT_TRUE(group.pack());
    const auto all = group.forward(torch::randn({2, 3, 6}));
    const auto parts = group.split(all);
    ASSERT_EQ(parts.size(), group.size());
    for (size_t i = 0; i < parts.size(); ++i) {
        const auto view = group.columns(all, i);
        EXPECT_FALSE(view.is_contiguous()) << i;
        EXPECT_TRUE(parts[i].is_contiguous()) << i;
        EXPECT_EQ(parts[i].sizes(), view.sizes()) << i;
        EXPECT_TRUE(torch::equal(parts[i], view)) << i;
    }
    EXPECT_THROW(group.split(torch::zeros({2, group.total_out() - 1})), c10::Error);
}

TEST(LinearGroup, DeclinesWhatItCannotPack) {
    torch::NoGradGuard no_grad;
    EXPECT_FALSE(nn::LinearGroup({}).pack());
    auto a = make_lora_linear(6, 4);
    auto other_input = make_lora_linear(5, 4);
    auto no_bias = make_lora_linear(6, 4, /*bias=*/false);
    auto half = make_lora_linear(6, 4);
    half->to(torch::kHalf);
    for (auto* b : {other_input.get(), no_bias.get(), half.get()}) {
        const void* where = a->weight.data_ptr();
        nn::LinearGroup group({a.get(), b});
        EXPECT_FALSE(group.pack());
        EXPECT_FALSE(group.ready(torch::kCPU));
        EXPECT_EQ(a->weight.data_ptr(), where);  // untouched
    }
    nn::LinearGroup group({a.get(), nullptr});
    EXPECT_FALSE(group.pack());
}

TEST(LinearGroup, ReplacedWeightsUnpackAndRepack) {
    Layers l;
    nn::LinearGroup group(l.raw());
    torch::NoGradGuard no_grad;
    ASSERT_TRUE(group.pack());
    // A move elsewhere (here: a fresh tensor, as Module::to and LoRA fuse make) unpacks.
    l.layers[1]->weight.set_data(l.layers[1]->weight.clone() * 2);
    EXPECT_FALSE(group.ready(torch::kCPU));
    const auto x = torch::randn({3, 6});
    const auto expected = l.separate(x);
    ASSERT_TRUE(group.pack());
    EXPECT_TRUE(group.ready(torch::kCPU));
    EXPECT_TRUE(all_close("repacked group", group.forward(x), expected, 1e-6));
    // Not on another device than the weights', and not where gradients are wanted.
    EXPECT_FALSE(group.ready(torch::Device(torch::kCUDA, 0)));
    {
        torch::AutoGradMode grad(true);
        EXPECT_TRUE(l.layers[0]->weight.requires_grad());  // libtorch's default
        EXPECT_FALSE(group.ready(torch::kCPU));
        // Still packed: pack() leaves it as it is.
        const void* where = l.layers[0]->weight.data_ptr();
        EXPECT_TRUE(group.packed(torch::kCPU));
        EXPECT_TRUE(group.pack());
        EXPECT_EQ(l.layers[0]->weight.data_ptr(), where);
        for (const auto& layer : l.layers)
            for (auto& p : layer->parameters()) p.set_requires_grad(false);
        EXPECT_TRUE(group.ready(torch::kCPU));
    }
}

TEST(LinearGroup, ContributingLoraAdapterDeclinesUntilFused) {
    Layers l;
    nn::LinearGroup group(l.raw());
    torch::NoGradGuard no_grad;
    ASSERT_TRUE(group.pack());
    auto* lora = dynamic_cast<LoraLinearImpl*>(l.layers[2].get());
    ASSERT_NE(lora, nullptr);
    lora->add_adapter("style", torch::randn({2, 6}), torch::randn({8, 2}), /*alpha=*/2.0);
    EXPECT_FALSE(group.ready(torch::kCPU));  // the branch would be missed
    EXPECT_TRUE(group.packed(torch::kCPU));  // the layout stays
    EXPECT_TRUE(group.pack());
    lora->set_lora_enabled(false);
    EXPECT_TRUE(group.ready(torch::kCPU));
    lora->set_lora_enabled(true);
    // Fused into one layer only: its weight is a new tensor and its original stays (rows of the
    // buffer) for the unfuse, so packing again would hold the other layers twice: declined.
    lora->fuse();
    EXPECT_FALSE(group.ready(torch::kCPU));
    EXPECT_FALSE(group.pack());
    lora->unfuse();  // the original rows again: packed as before
    EXPECT_TRUE(group.packed(torch::kCPU));
    // Fused into every layer: packed again, the group computes the fused weights.
    for (size_t i = 0; i < l.layers.size(); ++i) {
        auto* layer = dynamic_cast<LoraLinearImpl*>(l.layers[i].get());
        ASSERT_NE(layer, nullptr);
        if (!layer->has_adapter("style"))
            layer->add_adapter("style", torch::randn({2, 6}),
                               torch::randn({layer->weight.size(0), 2}), /*alpha=*/2.0);
        layer->fuse();
    }
    const auto x = torch::randn({3, 6});
    const auto expected = l.separate(x);
    EXPECT_FALSE(group.ready(torch::kCPU));
    ASSERT_TRUE(group.pack());
    EXPECT_TRUE(all_close("group with fused adapters", group.forward(x), expected, 1e-5));
}

// Whether both kinds of condition mappers are stored packed: the attention blocks' kv_mapper
// and the timestep blocks' mapper.
bool mappers_packed(const torch::nn::Module& model) {
    return test::stored_back_to_back(model, "kv_mapper.1.weight") &&
           test::stored_back_to_back(model, "kv_mapper.1.bias") &&
           test::stored_back_to_back(model, ".mapper.weight") &&
           test::stored_back_to_back(model, ".mapper.bias");
}
bool any_mappers_packed(const torch::nn::Module& model) {
    return test::stored_back_to_back(model, "kv_mapper.1.weight") ||
           test::stored_back_to_back(model, ".mapper.weight");
}
// Whether every attention block's to_q, to_k, to_v are packed (there being some), or none.
bool projections_packed(const torch::nn::Module& model) {
    const auto layout = test::attention_projection_layout(model);
    return layout.attention > 0 && layout.packed == layout.attention;
}
bool any_projections_packed(const torch::nn::Module& model) {
    return test::attention_projection_layout(model).packed > 0;
}
// Whether every layer of a CLIP text encoder has its q_proj, k_proj, v_proj packed.
bool clip_projections_packed(const CLIPTextModelImpl& model) {
    const auto layout = test::attention_projection_layout(model, test::kClipProjections);
    return layout.attention == model.config().num_hidden_layers &&
           layout.packed == layout.attention;
}

// SiLU, and the matrix products a Linear runs as (mm or addmm, by input rank and version; addmm_
// for a residual block's last layer summed into its input, nn::ResidualBiases).
const std::vector<std::string> kCounted = {"aten::silu", "aten::mm", "aten::addmm", "aten::addmm_"};
int products(const std::map<std::string, int>& counts) {
    return counts.at("aten::mm") + counts.at("aten::addmm") + counts.at("aten::addmm_");
}

TEST(PackedMappers, LoadersPackUnlessOffloading) {
    const std::string prior_dir = test::data_path("tiny-wuerstchen-prior/prior");
    const std::string decoder_dir = test::data_path("tiny-wuerstchen/decoder");
    auto prior = load_prior(prior_dir);
    auto decoder = load_diffnext(decoder_dir);
    EXPECT_TRUE(mappers_packed(*prior));
    EXPECT_TRUE(mappers_packed(*decoder));
    EXPECT_TRUE(projections_packed(*prior));
    EXPECT_TRUE(projections_packed(*decoder));
    EXPECT_EQ(test::attention_projection_layout(*prior).attention, prior->config().depth);
    const int64_t effnet = decoder->config().effnet_embd;
    EXPECT_GT(test::folded_layer_count(*decoder, effnet), 0);
    auto plain_prior = load_prior(prior_dir, test::unpacked_load());
    auto plain_decoder = load_diffnext(decoder_dir, test::unpacked_load());
    EXPECT_EQ(test::folded_layer_count(*plain_decoder, effnet), 0);
    for (const torch::nn::Module* plain :
         {static_cast<const torch::nn::Module*>(plain_prior.get()),
          static_cast<const torch::nn::Module*>(plain_decoder.get())}) {
        EXPECT_FALSE(any_mappers_packed(*plain));
        EXPECT_FALSE(any_projections_packed(*plain));
    }
}

TEST(PackedMappers, PipelinesPackTheModelsTheyAreGiven) {
    // Modules a program loaded unpacked (here: the loaders' offload form, which on the CPU runs
    // resident) get packed by the pipelines that run them.
    const std::string prior_dir = test::data_path("tiny-wuerstchen-prior");
    auto prior = load_prior(prior_dir + "/prior", test::unpacked_load());
    ASSERT_FALSE(any_mappers_packed(*prior));
    ASSERT_FALSE(any_projections_packed(*prior));
    auto prior_text = load_clip_text_model(prior_dir + "/text_encoder", test::unpacked_load());
    ASSERT_FALSE(clip_projections_packed(*prior_text));
    PriorPipeline prior_pipe(CLIPTokenizer::from_pretrained(prior_dir + "/tokenizer"), prior_text,
                             prior, DDPMWuerstchenScheduler(), PriorPipelineConfig{},
                             LoadOptions{});
    EXPECT_TRUE(mappers_packed(*prior));
    EXPECT_TRUE(projections_packed(*prior));
    EXPECT_TRUE(clip_projections_packed(*prior_text));

    const std::string decoder_dir = test::data_path("tiny-wuerstchen");
    auto decoder = load_diffnext(decoder_dir + "/decoder", test::unpacked_load());
    ASSERT_FALSE(any_mappers_packed(*decoder));
    ASSERT_FALSE(any_projections_packed(*decoder));
    const int64_t effnet = decoder->config().effnet_embd;
    ASSERT_EQ(test::folded_layer_count(*decoder, effnet), 0);
    auto decoder_text = load_clip_text_model(decoder_dir + "/text_encoder", test::unpacked_load());
    ASSERT_FALSE(clip_projections_packed(*decoder_text));
    DecoderComponents parts{CLIPTokenizer::from_pretrained(decoder_dir + "/tokenizer"),
                            decoder_text, decoder,
                            load_paella_vq(decoder_dir + "/vqgan", test::unpacked_load())};
    const auto decoder_pipe = DecoderPipeline::from_components(std::move(parts), LoadOptions{});
    EXPECT_TRUE(mappers_packed(*decoder));
    EXPECT_TRUE(projections_packed(*decoder));
    EXPECT_TRUE(clip_projections_packed(*decoder_text));
    EXPECT_GT(test::folded_layer_count(*decoder, effnet), 0);
}

// Runs forward(model) on the per-block and the packed model: per block a SiLU and a matrix
// product for each kv_mapper (SiLU, then Linear), a product for each timestep mapper and three
// for each attention's q, k, v; packed, one SiLU and one product per kind of mapper and one per
// attention. The outputs are the same products, grouped, except that the packed model also
// moves the residual blocks' last biases into the timestep blocks' shifts (nn::ResidualBiases),
// which rounds differently: equal up to float32 rounding.
template <class Model, class Forward>
void expect_same_in_fewer_ops(const std::string& what, Model& plain, Model& packed,
                              Forward forward) {
    ASSERT_TRUE(mappers_packed(*packed)) << what;
    ASSERT_TRUE(projections_packed(*packed)) << what;
    ASSERT_FALSE(any_mappers_packed(*plain)) << what;
    ASSERT_FALSE(any_projections_packed(*plain)) << what;
    const int attention =
        static_cast<int>(test::parameters_named(*plain, "kv_mapper.1.weight").size());
    const int timestep = static_cast<int>(test::parameters_named(*plain, ".mapper.weight").size());
    ASSERT_GT(attention, 1) << what;
    ASSERT_GT(timestep, 1) << what;
    c10::InferenceMode guard;
    torch::Tensor expected, out;
    const auto per_block = count_ops(kCounted, [&] { expected = forward(plain); });
    const auto grouped = count_ops(kCounted, [&] { out = forward(packed); });
    EXPECT_EQ(per_block.at("aten::silu"), attention) << what;
    EXPECT_EQ(grouped.at("aten::silu"), 1) << what;
    EXPECT_EQ(products(per_block) - products(grouped),
              (attention - 1) + (timestep - 1) + 2 * attention)
        << what;
    EXPECT_TRUE(
        all_close(what + ", packed vs per block", out, expected, test::scaled_tol(expected, 1e-5)));
}

TEST(PackedMappers, PriorSameWithAndWithoutPacking) {
    const auto ref = test::reference("prior_forward");
    const std::string dir = test::data_path("tiny-wuerstchen-prior/prior");
    auto packed = load_prior(dir);
    auto plain = load_prior(dir, test::unpacked_load());
    EXPECT_EQ(test::parameters_named(*plain, ".mapper.weight").size(),
              static_cast<size_t>(plain->config().depth));
    expect_same_in_fewer_ops("prior forward", plain, packed, [&](WuerstchenPrior& model) {
        return model->forward(test::ref_tensor(ref, "x"), test::ref_tensor(ref, "r"),
                              test::ref_tensor(ref, "c"));
    });
}

TEST(PackedMappers, DecoderSameWithAndWithoutPacking) {
    const auto ref = test::reference("decoder_forward");
    const std::string dir = test::data_path("tiny-wuerstchen/decoder");
    auto packed = load_diffnext(dir);
    auto plain = load_diffnext(dir, test::unpacked_load());
    // The loader also folds the effnet mappers into the residual blocks, which changes the
    // products counted here (DiffNeXt.FoldedEffnetMappersGiveTheSameForward covers it): copies
    // of those weights undo the fold alone.
    torch::NoGradGuard no_grad;
    for (auto& w : test::parameters_named(*packed, "channelwise.0.weight"))
        w.set_data(w.detach().clone());
    expect_same_in_fewer_ops("decoder forward", plain, packed, [&](WuerstchenDiffNeXt& model) {
        return model->forward(test::ref_tensor(ref, "x"), test::ref_tensor(ref, "r"),
                              test::ref_tensor(ref, "effnet"), test::ref_tensor(ref, "clip"));
    });
}

TEST(PackedMappers, ParametersEqualTheUnpackedModel) {
    // Packed parameters are views of one buffer, with each layer's name, shape and values.
    auto prior = load_prior(test::data_path("tiny-wuerstchen-prior/prior"));
    ASSERT_TRUE(mappers_packed(*prior));
    ASSERT_TRUE(projections_packed(*prior));
    auto plain = load_prior(test::data_path("tiny-wuerstchen-prior/prior"), test::unpacked_load());
    test::expect_same_structure(*plain, *prior);
    test::expect_same_values(*plain, *prior);
}

// A self-attention block (c 8, c_cond 6, 2 heads) with random weights from `seed`.
nn::AttnBlock random_attn_block(uint64_t seed, bool self_attn = true) {
    nn::AttnBlock block(8, 6, 2, self_attn);
    torch::manual_seed(seed);
    torch::NoGradGuard no_grad;
    for (auto& p : block->parameters()) p.copy_(torch::randn(p.sizes()) * 0.3);
    return block;
}

TEST(PackedProjections, OneProductForQueriesKeysAndValues) {
    auto plain = random_attn_block(5);
    auto packed = random_attn_block(5);
    EXPECT_TRUE(nn::pack_attention_projections({packed.get()}));
    EXPECT_TRUE(projections_packed(*packed));
    EXPECT_FALSE(any_projections_packed(*plain));
    test::expect_same_values(*plain, *packed);
    torch::manual_seed(6);
    const auto x = torch::randn({2, 8, 3, 4});
    const auto cond = torch::randn({2, 5, 6});
    c10::InferenceMode guard;
    torch::Tensor expected, out;
    const auto separate = count_ops(kCounted, [&] { expected = plain->forward(x, cond); });
    const auto joint = count_ops(kCounted, [&] { out = packed->forward(x, cond); });
    EXPECT_EQ(products(separate) - products(joint), 2);  // q, k, v: one product instead of three
    EXPECT_TRUE(all_close("packed vs separate projections", out, expected,
                          test::scaled_tol(expected, 1e-6)));
}

TEST(PackedProjections, ContributingLoraAdapterProjectsSeparately) {
    auto plain = random_attn_block(7);
    auto packed = random_attn_block(7);
    ASSERT_TRUE(nn::pack_attention_projections({packed.get()}));
    torch::manual_seed(8);
    const auto down = torch::randn({2, 8});
    const auto up = torch::randn({8, 2});
    for (auto* block : {plain.get(), packed.get()}) {
        auto* to_k = dynamic_cast<LoraLinearImpl*>(block->attention->to_k.get());
        ASSERT_NE(to_k, nullptr);
        to_k->add_adapter("style", down, up, /*alpha=*/2.0);
    }
    EXPECT_FALSE(packed->attention->projections().ready(torch::kCPU));  // the branch counts
    EXPECT_TRUE(projections_packed(*packed));                           // the layout stays
    const auto x = torch::randn({2, 8, 3, 4});
    const auto cond = torch::randn({2, 5, 6});
    c10::InferenceMode guard;
    torch::Tensor expected, out;
    const auto separate = count_ops(kCounted, [&] { expected = plain->forward(x, cond); });
    const auto declined = count_ops(kCounted, [&] { out = packed->forward(x, cond); });
    EXPECT_EQ(products(declined), products(separate));
    EXPECT_TRUE(all_close("packed block with a LoRA adapter on to_k", out, expected, 0.0));
}

// With project_kv (the pipelines' conditions by default on the CPU), the condition carries each
// self-attention block's keys and values of its text rows (map_kv_packed, once per call), so a
// step projects only x's rows: two products (q, k, v of x; to_out) instead of the per-block
// model's five (kv_mapper; q, k, v; to_out).
TEST(PackedProjections, TextKeysAndValuesProjectedOncePerCondition) {
    auto plain = random_attn_block(10);
    auto packed = random_attn_block(10);
    ASSERT_TRUE(nn::kv_mappers({packed.get()}).pack());
    ASSERT_TRUE(nn::pack_attention_projections({packed.get()}));
    torch::manual_seed(11);
    const auto x = torch::randn({2, 8, 3, 4});
    const auto cond = torch::randn({2, 5, 6});
    c10::InferenceMode guard;
    EXPECT_EQ(nn::map_kv_packed({packed.get()}, cond).kv.at(0).sizes(),
              (std::vector<int64_t>{2, 5, 8}));  // without project_kv: the mapped rows
    const auto kv = nn::map_kv_packed({packed.get()}, cond, /*project_kv=*/true).kv;
    ASSERT_EQ(kv.size(), 1u);
    EXPECT_EQ(kv[0].sizes(), (std::vector<int64_t>{2, 5, 16}));  // [B, L, 2c]: k then v
    EXPECT_TRUE(kv[0].is_contiguous());
    torch::Tensor expected, out;
    const auto per_block = count_ops(kCounted, [&] { expected = plain->forward(x, cond); });
    const auto step = count_ops(kCounted, [&] { out = packed->forward_mapped(x, kv[0]); });
    EXPECT_EQ(products(per_block), 5);
    EXPECT_EQ(products(step), 2);
    EXPECT_TRUE(all_close("text keys and values projected ahead vs per block", out, expected,
                          test::scaled_tol(expected, 1e-6)));
    // The keys and values came from the packed product: where it cannot run (autograd here, a
    // contributing LoRA adapter below), the step would mix two forms, and refuses.
    {
        c10::InferenceMode off(false);
        EXPECT_THROW(packed->forward_mapped(x, kv[0]), InvalidArgument);
    }

    // Where the projections cannot run packed (a contributing LoRA adapter), the condition keeps
    // the mapped text rows and each step projects [x ; mapped].
    auto* to_v = dynamic_cast<LoraLinearImpl*>(packed->attention->to_v.get());
    ASSERT_NE(to_v, nullptr);
    {
        c10::InferenceMode off(false);
        to_v->add_adapter("style", torch::randn({2, 8}), torch::randn({8, 2}), /*alpha=*/2.0);
    }
    EXPECT_THROW(packed->forward_mapped(x, kv[0]), InvalidArgument);
    const auto mapped = nn::map_kv_packed({packed.get()}, cond, /*project_kv=*/true).kv;
    ASSERT_EQ(mapped.size(), 1u);
    EXPECT_EQ(mapped[0].sizes(), (std::vector<int64_t>{2, 5, 8}));
}

TEST(PackedProjections, CrossAttentionIsLeftAlone) {
    // Its queries read other rows than its keys and values: nothing to share.
    auto cross = random_attn_block(9, /*self_attn=*/false);
    EXPECT_TRUE(nn::pack_attention_projections({cross.get()}));
    EXPECT_FALSE(any_projections_packed(*cross));
}

TEST(PackedMappers, AddOneToScalesOneOpPerRunOfEqualWidths) {
    // Timestep mappers of widths 2C = 8, 8, 12, 8: three runs of equal width.
    const Layers l({8, 8, 12, 8}, 3, 11);
    nn::LinearGroup group(l.raw());
    ASSERT_TRUE(group.pack());
    c10::InferenceMode guard;
    const auto r = torch::randn({2, 3});
    auto all = group.forward(r);
    const auto mapped = all.clone();
    // One scalar add_ dispatches as one or more nested add_ records, by version.
    auto scratch = torch::zeros({2});
    const int per_op = count_ops({"aten::add_"}, [&] { scratch.add_(1); }).at("aten::add_");
    ASSERT_GE(per_op, 1);
    const auto ops = count_ops({"aten::add_"}, [&] { nn::add_one_to_scales(group, all); });
    EXPECT_EQ(ops.at("aten::add_"), 3 * per_op);
    const auto x = torch::randn({2, 4, 3, 3});
    for (size_t i = 0; i < group.size(); ++i) {
        const int64_t c = group.out_features(i) / 2;
        const auto before = group.columns(mapped, i);
        const auto after = group.columns(all, i);
        const std::string what = "layer " + std::to_string(i);
        EXPECT_TRUE(torch::equal(after.narrow(1, 0, c), before.narrow(1, 0, c) + 1)) << what;
        EXPECT_TRUE(torch::equal(after.narrow(1, c, c), before.narrow(1, c, c))) << what;
        const auto xi = x.narrow(1, 0, 1).expand({2, c, 3, 3}).contiguous();
        nn::TimestepBlock block(c, 3);
        EXPECT_TRUE(torch::equal(block->modulate_scaled(xi, after), block->modulate(xi, before)))
            << what;
    }
    auto wrong = torch::zeros({2, group.total_out() + 1});
    EXPECT_THROW(nn::add_one_to_scales(group, wrong), c10::Error);
}

// A LoRA-capable Linear(in 10, out 7) whose last 4 inputs are M u + m for u of width 3.
struct FoldCase {
    FoldCase() {
        torch::manual_seed(21);
        layer = make_lora_linear(10, 7);
        map_weight = torch::randn({4, 3});
        map_bias = torch::randn({4});
        a = torch::randn({2, 5, 6});
        u = torch::randn({2, 5, 3});
    }
    // The layer over [a, M u + m], as upstream computes it.
    torch::Tensor unfolded() const {
        return lora_forward(layer, torch::cat({a, at::linear(u, map_weight, map_bias)}, -1));
    }
    torch::nn::Linear layer{nullptr};
    torch::Tensor map_weight, map_bias, a, u;
};

TEST(InputFold, OneProductOverTheNarrowInput) {
    FoldCase c;
    torch::NoGradGuard no_grad;
    const auto original = c.layer->weight.detach().clone();
    const auto expected = c.unfolded();
    nn::InputFold fold;
    EXPECT_FALSE(fold.ready(*c.layer, c.map_weight, c.map_bias, torch::kCPU));
    EXPECT_THROW(fold.forward(*c.layer, torch::cat({c.u, c.a}, -1)), c10::Error);
    ASSERT_TRUE(fold.fold(*c.layer, c.map_weight, c.map_bias));
    EXPECT_TRUE(fold.ready(*c.layer, c.map_weight, c.map_bias, torch::kCPU));
    // The parameter keeps its shape and values, with 3 spare columns in front of each row.
    EXPECT_TRUE(c.layer->weight.equal(original));
    EXPECT_EQ(c.layer->weight.strides(), c10::IntArrayRef({13, 1}));
    // Folded already: nothing is written again.
    const auto version = c.layer->weight._version();
    const void* data = c.layer->weight.data_ptr();
    EXPECT_TRUE(fold.fold(*c.layer, c.map_weight, c.map_bias));
    EXPECT_EQ(c.layer->weight._version(), version);
    EXPECT_EQ(c.layer->weight.data_ptr(), data);
    torch::Tensor out;
    const auto ops = count_ops(kCounted, [&] {
        out = fold.forward(*c.layer, torch::cat({c.u, c.a}, -1));
    });
    EXPECT_EQ(products(ops), 1);
    EXPECT_EQ(out.sizes(), expected.sizes());
    EXPECT_TRUE(
        all_close("folded vs mapped input", out, expected, test::scaled_tol(expected, 1e-6)));
    // The layer's own forward still reads the same parameter (now a strided view).
    EXPECT_TRUE(all_close("layer forward, laid out", c.unfolded(), expected, 0.0));
}

TEST(InputFold, InPlaceChangesNeedAnotherFold) {
    FoldCase c;
    torch::NoGradGuard no_grad;
    nn::InputFold fold;
    ASSERT_TRUE(fold.fold(*c.layer, c.map_weight, c.map_bias));
    auto ready = [&] { return fold.ready(*c.layer, c.map_weight, c.map_bias, torch::kCPU); };
    // Each of the four tensors changed in place (the layout stays) makes the fold stale, and
    // another fold() folds the new values.
    const std::vector<std::function<void()>> changes = {
        [&] { c.layer->weight.mul_(0.5).add_(0.25); }, [&] { c.layer->bias.add_(1.0); },
        [&] { c.map_weight.mul_(-2.0); }, [&] { c.map_bias.sub_(0.5); }};
    // The folds write in place: a CUDA graph captured after the first reads the same memory.
    const void* weight_data = c.layer->weight.data_ptr();
    const void* bias_data = fold.bias().data_ptr();
    for (size_t i = 0; i < changes.size(); ++i) {
        changes[i]();
        EXPECT_FALSE(ready()) << "change " << i;
        ASSERT_TRUE(fold.fold(*c.layer, c.map_weight, c.map_bias)) << "change " << i;
        EXPECT_TRUE(ready()) << "change " << i;
        EXPECT_EQ(c.layer->weight.data_ptr(), weight_data) << "change " << i;
        EXPECT_EQ(fold.bias().data_ptr(), bias_data) << "change " << i;
        const auto expected = c.unfolded();
        EXPECT_TRUE(all_close("folded again after change " + std::to_string(i),
                              fold.forward(*c.layer, torch::cat({c.u, c.a}, -1)), expected,
                              test::scaled_tol(expected, 1e-6)));
    }
    // A write through data() (its own version counter) is not seen; folding again is.
    c.map_weight.data().mul_(3.0);
    EXPECT_TRUE(ready());
    ASSERT_TRUE(fold.fold(*c.layer, c.map_weight, c.map_bias, /*again=*/true));
    const auto expected = c.unfolded();
    EXPECT_TRUE(all_close("folded again after a write through data()",
                          fold.forward(*c.layer, torch::cat({c.u, c.a}, -1)), expected,
                          test::scaled_tol(expected, 1e-6)));
    EXPECT_EQ(fold.bias().data_ptr(), bias_data);
    // Other tensors of the same shapes are not the ones folded.
    EXPECT_FALSE(fold.ready(*c.layer, c.map_weight.clone(), c.map_bias, torch::kCPU));
    EXPECT_FALSE(fold.ready(*c.layer, c.map_weight, c.map_bias.clone(), torch::kCPU));
}

TEST(InputFold, DeclinesOrUndoes) {
    FoldCase c;
    torch::NoGradGuard no_grad;
    nn::InputFold fold;
    EXPECT_FALSE(fold.fold(*c.layer, torch::randn({11, 3}), torch::randn({11})));  // > in
    EXPECT_FALSE(fold.fold(*c.layer, c.map_weight, torch::randn({3})));
    EXPECT_FALSE(fold.fold(*c.layer, c.map_weight.to(torch::kFloat64), c.map_bias));
    auto no_bias = make_lora_linear(10, 7, /*bias=*/false);
    EXPECT_FALSE(fold.fold(*no_bias, c.map_weight, c.map_bias));
    {
        c10::InferenceMode guard;  // inference tensors cannot show a later change
        EXPECT_FALSE(fold.fold(*c.layer, torch::randn({4, 3}), c.map_bias));
    }
    EXPECT_TRUE(c.layer->weight.is_contiguous());  // none of the above laid it out
    ASSERT_TRUE(fold.fold(*c.layer, c.map_weight, c.map_bias));
    EXPECT_FALSE(fold.ready(*c.layer, c.map_weight, c.map_bias, torch::Device(torch::kCUDA, 0)));
    // A replaced weight (a move, a LoRA fuse) undoes the fold, and the fold does not keep the
    // old buffer alive.
    const auto old_buffer = c.layer->weight.storage().getWeakStorageImpl();
    c.layer->weight.set_data(c.layer->weight.detach().clone());
    EXPECT_TRUE(old_buffer.expired());
    EXPECT_FALSE(fold.ready(*c.layer, c.map_weight, c.map_bias, torch::kCPU));
    EXPECT_THROW(fold.forward(*c.layer, torch::cat({c.u, c.a}, -1)), c10::Error);
    ASSERT_TRUE(fold.fold(*c.layer, c.map_weight, c.map_bias));
    EXPECT_TRUE(fold.ready(*c.layer, c.map_weight, c.map_bias, torch::kCPU));
    // An unmerged LoRA adapter that contributes: the layer must run its own forward.
    auto* lora = dynamic_cast<LoraLinearImpl*>(c.layer.get());
    ASSERT_NE(lora, nullptr);
    lora->add_adapter("style", torch::randn({2, 10}), torch::randn({7, 2}), /*alpha=*/2.0);
    EXPECT_FALSE(fold.ready(*c.layer, c.map_weight, c.map_bias, torch::kCPU));
}

// Residual and timestep blocks in the models' order (R, T, R, T, ...), widths C = 8, 8, 12,
// every parameter drawn at random (a fresh GRN and some biases are zeros), in float64; the
// timestep mappers and the residual biases packed (`packed`: both).
struct ResidualPairs {
    std::vector<nn::ResBlock> res;
    std::vector<nn::TimestepBlock> ts;
    std::vector<torch::nn::Module*> blocks;
    nn::LinearGroup timesteps{{}};
    nn::ResidualBiases biases{{}};
    bool packed = false;
    explicit ResidualPairs(uint64_t seed) {
        torch::NoGradGuard no_grad;
        torch::manual_seed(seed);
        for (const int64_t c : {8, 8, 12}) {
            res.emplace_back(c);
            ts.emplace_back(c, 6);
            for (torch::nn::Module* m : {static_cast<torch::nn::Module*>(res.back().get()),
                                         static_cast<torch::nn::Module*>(ts.back().get())}) {
                m->to(torch::kFloat64);
                for (auto& p : m->parameters()) p.uniform_(-0.5, 0.5);
                blocks.push_back(m);
            }
        }
        timesteps = nn::timestep_mappers(blocks);
        biases = nn::ResidualBiases(blocks);
        packed = timesteps.pack() && biases.pack();
    }
};

TEST(ResidualBiases, FoldedShiftEqualsResidualThenModulation) {
    // T(R(x)) as upstream computes it, against R's product summed into x without fc2's bias and
    // that bias moved into T's shift: b + c (1 + a).
    ResidualPairs p(21);
    ASSERT_TRUE(p.packed);
    const nn::LinearGroup& t_group = p.timesteps;
    nn::ResidualBiases& biases = p.biases;
    // fc2's biases back to back: 8, 8, 12 values.
    const auto& first = p.res[0]->channelwise->fc2->bias;
    for (size_t i = 0; i < p.res.size(); ++i)
        EXPECT_EQ(p.res[i]->channelwise->fc2->bias.data_ptr<double>(),
                  first.data_ptr<double>() + 8 * static_cast<int64_t>(i));
    c10::InferenceMode guard;
    auto all = t_group.forward(torch::randn({2, 6}, torch::kFloat64));
    nn::add_one_to_scales(t_group, all);
    auto folded = all.clone();
    ASSERT_TRUE(biases.ready(t_group, folded));
    // One op per run of equally wide blocks (8, 8 | 12).
    const auto ops = count_ops({"aten::addcmul_"}, [&] { biases.fold_into(t_group, folded); });
    EXPECT_EQ(ops.at("aten::addcmul_"), 2);
    for (size_t i = 0; i < p.res.size(); ++i) {
        const auto x =
            torch::randn({2, p.res[i]->channelwise->fc2->weight.size(0), 5, 4}, torch::kFloat64);
        const auto expected =
            p.ts[i]->modulate_scaled(p.res[i]->forward(x), t_group.columns(all, i));
        for (const bool channels_last : {false, true}) {
            const std::string what =
                "block " + std::to_string(i) + (channels_last ? ", NHWC" : ", NCHW");
            auto input = channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.clone();
            const void* data = input.data_ptr();
            torch::Tensor out;
            const auto counted = count_ops({"aten::add", "aten::addmm_"}, [&] {
                out = p.res[i]->forward(input, {}, /*bias_folded=*/true);
            });
            // NHWC: the product is summed into the input, no residual pass of its own.
            EXPECT_EQ(counted.at("aten::addmm_"), channels_last ? 1 : 0) << what;
            EXPECT_EQ(out.data_ptr() == data, channels_last) << what;
            const auto got = p.ts[i]->modulate_scaled(out, t_group.columns(folded, i));
            EXPECT_TRUE(all_close(what + ": folded bias vs upstream order", got, expected, 1e-12));
        }
    }
}

TEST(ResidualBiases, NotReadyWhereTheFoldWouldBeWrong) {
    ResidualPairs p(22);
    ASSERT_TRUE(p.packed);
    const nn::LinearGroup& t_group = p.timesteps;
    nn::ResidualBiases& biases = p.biases;
    torch::NoGradGuard no_grad;
    const auto all = t_group.forward(torch::randn({1, 6}, torch::kFloat64));
    EXPECT_TRUE(biases.ready(t_group, all));
    {
        torch::AutoGradMode grad(true);  // the product into x would be an in-place op
        EXPECT_FALSE(biases.ready(t_group, all));
    }
    EXPECT_FALSE(biases.ready(t_group, all.to(torch::kFloat32))) << "another dtype";
    EXPECT_FALSE(biases.ready(t_group, all.narrow(1, 0, 8))) << "another group's mapping";
    // An unfused LoRA adapter on an fc2 adds its branch to the product: left as it is.
    auto* fc2 = dynamic_cast<LoraLinearImpl*>(p.res[1]->channelwise->fc2.get());
    ASSERT_NE(fc2, nullptr);
    fc2->add_adapter("a", torch::randn({2, 32}), torch::randn({8, 2}), 2.0);
    EXPECT_FALSE(biases.ready(t_group, all));
    fc2->set_lora_enabled(false);
    EXPECT_TRUE(biases.ready(t_group, all));
    // A bias replaced (a move, a LoRA fuse of a bias-less copy...) is no longer packed.
    p.res[2]->channelwise->fc2->bias.set_data(p.res[2]->channelwise->fc2->bias.clone());
    EXPECT_FALSE(biases.ready(t_group, all));
    EXPECT_TRUE(biases.pack());
    EXPECT_TRUE(biases.ready(t_group, all));
    // A timestep block that follows no residual block, or a residual block that no timestep
    // block follows (its bias would be lost): no fold at all.
    for (const auto& order :
         std::vector<std::vector<torch::nn::Module*>>{{p.blocks[1], p.blocks[0], p.blocks[3]},
                                                      {p.blocks[0], p.blocks[1], p.blocks[2]},
                                                      {p.blocks[0], p.blocks[2], p.blocks[3]}}) {
        nn::ResidualBiases none(order);
        EXPECT_FALSE(none.pack());
        EXPECT_FALSE(none.ready(nn::timestep_mappers(order), all));
    }
}

TEST(ResidualBiases, DecoderLevelsWithoutTheFoldGiveTheSameForward) {
    // Decoder level configs where a residual block is followed by an attention block, another
    // residual block or the level's end: the loaders' packed model must not fold (it would drop
    // those blocks' biases) and so equals the unpacked one.
    const auto dir = test::make_temp_dir("wuerstchen_residual_biases");
    for (const auto& levels : std::vector<std::vector<std::string>>{
             {"CT", "CTA"}, {"CT", "CA"}, {"CT", "CTC"}, {"CCT", "CTA"}}) {
        DiffNeXtConfig config;
        config.c_hidden = {8, 16};
        config.nhead = {-1, 2};
        config.blocks = {1, 1};
        config.level_config = levels;
        config.inject_effnet = {false, true};
        config.dropout = {0.0, 0.0};
        config.effnet_embd = 4;
        config.c_cond = 8;
        config.c_r = 6;
        config.clip_embd = 8;
        torch::manual_seed(3);
        WuerstchenDiffNeXt plain(config);
        {
            torch::NoGradGuard no_grad;
            for (auto& t : plain->parameters()) t.uniform_(-0.3, 0.3);
        }
        WuerstchenDiffNeXt packed(config);
        {
            torch::NoGradGuard no_grad;
            const auto from = plain->parameters();
            const auto to = packed->parameters();
            for (size_t i = 0; i < from.size(); ++i) to[i].copy_(from[i]);
        }
        packed->pack_condition_mappers();
        const std::string what = levels[0] + "," + levels[1];
        c10::InferenceMode guard;
        const auto x = torch::randn({1, config.c_in, 16, 16});
        const auto r = torch::rand({1});
        const auto effnet = torch::randn({1, config.effnet_embd, 6, 6});
        const auto clip = torch::randn({1, 5, config.clip_embd});
        const auto expected = plain->forward(x, r, effnet, clip);
        EXPECT_TRUE(all_close(what + ": packed vs plain", packed->forward(x, r, effnet, clip),
                              expected, test::scaled_tol(expected, 1e-5)));
    }
}

}  // namespace
}  // namespace wuerstchen
