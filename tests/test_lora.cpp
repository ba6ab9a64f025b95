// LoRA for the stage-C prior and its text encoder against diffusers
// (tests/data/lora, made by shared/tools/gen_lora.py: peft keys, rank 4, no alpha -> scale 1).

#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "nn/blocks.h"
#include "test_util.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/prior_pipeline.h"
#include "wuerstchen/safetensors.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::data_path;
using test::ref_tensor;
using test::scaled_tol;

using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

const std::string kPipelineDir = "tiny-wuerstchen-prior";
const std::string kLoraDir = "lora/tiny-prior-lora";

std::string lora_file() { return data_path(kLoraDir + "/pytorch_lora_weights.safetensors"); }

SafeTensors lora_reference() {
    return SafeTensors::open(data_path("lora/lora_reference.safetensors"));
}

PriorPipeline make_pipeline(const LoadOptions& options = {}) {
    return PriorPipeline::from_pretrained(data_path(kPipelineDir), options);
}

// The reference call of gen_lora.py.
PriorOptions reference_options() {
    PriorOptions o;
    o.prompt("a red sports car");
    o.height = 256;
    o.width = 256;
    o.num_inference_steps = 3;
    o.guidance_scale = 4.0;
    o.seed = 3;
    return o;
}

torch::Tensor run(PriorPipeline& pipe) { return pipe(reference_options()).image_embeddings; }

torch::Tensor prior_forward(PriorPipeline& pipe, const SafeTensors& ref) {
    c10::InferenceMode guard;
    const auto device = pipe.device();
    const auto dtype = pipe.prior()->projection->weight.scalar_type();
    return pipe.prior()
        ->forward(ref_tensor(ref, "forward_x").to(device, dtype),
                  ref_tensor(ref, "forward_r").to(device, dtype),
                  ref_tensor(ref, "forward_c").to(device, dtype))
        .to(torch::kCPU, torch::kFloat32);
}

// Owned copies of every parameter of both models.
std::map<std::string, torch::Tensor> snapshot(PriorPipeline& pipe) {
    std::map<std::string, torch::Tensor> out;
    for (const auto& p : pipe.prior()->named_parameters())
        out["prior." + p.key()] = p.value().clone();
    for (const auto& p : pipe.text_encoder()->named_parameters())
        out["text_encoder." + p.key()] = p.value().clone();
    return out;
}

// The fixture's tensors, renamed by `rename` (an empty name drops the tensor).
Tensors fixture_tensors(const std::function<std::string(const std::string&)>& rename) {
    auto file = SafeTensors::open(lora_file());
    Tensors out;
    for (const auto& key : file.keys()) {
        const std::string name = rename(key);
        if (!name.empty()) out.emplace_back(name, file.tensor(key).clone());
    }
    return out;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    for (size_t pos = 0; (pos = s.find(from, pos)) != std::string::npos; pos += to.size())
        s.replace(pos, from.size(), to);
    return s;
}

std::string write_lora(const std::string& name, const Tensors& tensors,
                       const std::map<std::string, std::string>& metadata = {}) {
    static const std::string dir = test::make_temp_dir("wuerstchen_lora");
    const std::string path = dir + "/" + name + ".safetensors";
    save_safetensors(path, tensors, metadata);
    return path;
}

// ------------------------------------------------------------------------------ parity

TEST(Lora, PipelineMatchesDiffusers) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    const auto base = snapshot(pipe);

    auto expected = ref_tensor(ref, "no_lora");
    EXPECT_TRUE(all_close("no_lora", run(pipe), expected, scaled_tol(expected, 1e-3)));

    pipe.load_lora_weights(data_path(kLoraDir));  // the folder form
    EXPECT_EQ(pipe.lora_adapters(), std::vector<std::string>{"default"});
    expected = ref_tensor(ref, "lora_scale_1");
    EXPECT_TRUE(all_close("lora_scale_1", run(pipe), expected, scaled_tol(expected, 1e-3)));

    pipe.fuse_lora(0.5);
    expected = ref_tensor(ref, "lora_fused_0.5");
    EXPECT_TRUE(all_close("lora_fused_0.5", run(pipe), expected, scaled_tol(expected, 1e-3)));

    pipe.unfuse_lora();
    pipe.unload_lora_weights();
    EXPECT_TRUE(pipe.lora_adapters().empty());
    expected = ref_tensor(ref, "after_unload");
    EXPECT_TRUE(all_close("after_unload", run(pipe), expected, scaled_tol(expected, 1e-3)));
    for (const auto& [name, value] : snapshot(pipe))
        EXPECT_TRUE(torch::equal(value, base.at(name))) << name << " changed";
}

TEST(Lora, PriorForwardMatchesDiffusers) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    pipe.load_lora_weights(lora_file());  // the file form
    auto expected = ref_tensor(ref, "forward_lora_scale_1");
    EXPECT_TRUE(all_close("forward_lora_scale_1", prior_forward(pipe, ref), expected,
                          scaled_tol(expected, 1e-4)));
}

TEST(Lora, FusedMatchesUnfusedAtSameScale) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    const auto base_out = prior_forward(pipe, ref);
    pipe.load_lora_weights(lora_file(), "style", 0.5);
    const auto unfused = prior_forward(pipe, ref);
    pipe.set_adapters({"style"}, {1.0});
    pipe.fuse_lora(0.5);
    const auto fused = prior_forward(pipe, ref);
    EXPECT_TRUE(all_close("fused vs unfused at 0.5", fused, unfused, scaled_tol(unfused, 1e-4)));
    EXPECT_GT(test::max_abs_diff(fused, base_out), 1e-2) << "the LoRA changes nothing";
    // A fused adapter is not applied a second time by the unfused branch.
    pipe.unfuse_lora();
    pipe.set_adapters({"style"}, {0.5});
    EXPECT_TRUE(all_close("unfused again", prior_forward(pipe, ref), unfused, 1e-6));
}

TEST(Lora, UnfuseRestoresWeightsBitExact) {
    auto pipe = make_pipeline();
    const auto base = snapshot(pipe);
    pipe.load_lora_weights(lora_file(), "a", 0.7);
    pipe.fuse_lora(1.3);
    const auto q = "prior.blocks.2.attention.to_q.weight";
    EXPECT_FALSE(torch::equal(snapshot(pipe).at(q), base.at(q)));
    pipe.fuse_lora(2.0);  // nothing left to merge: no change
    pipe.unfuse_lora();
    for (const auto& [name, value] : snapshot(pipe))
        EXPECT_TRUE(torch::equal(value, base.at(name))) << name << " not restored";
    pipe.unfuse_lora();  // no-op when not fused
}

// How many attention modules of the pipeline's prior and text encoder keep q, k and v in one
// buffer, and how many there are.
std::pair<int, int> packed_projections(PriorPipeline& pipe) {
    const auto prior = test::attention_projection_layout(*pipe.prior());
    const auto text =
        test::attention_projection_layout(*pipe.text_encoder(), test::kClipProjections);
    return {prior.packed + text.packed, prior.attention + text.attention};
}

TEST(Lora, FuseAndUnfuseKeepTheFastLayout) {
    // Fusing gives the merged layers new weights, which undoes their packing; the pipeline packs
    // groups whose layers are all fused again, and everything after unfusing or unloading.
    // Adapters: the reference one (the prior's q, k, v and out of two blocks: whole groups), and
    // one on a single text-encoder q_proj and a single kv_mapper (a part of their groups, which
    // stay unpacked while fused: packing them would hold their other layers twice).
    auto pipe = make_pipeline();
    const auto all = packed_projections(pipe).second;
    ASSERT_GT(all, 0);
    EXPECT_EQ(packed_projections(pipe).first, all);
    const int64_t hidden = pipe.text_encoder()->config().hidden_size;
    const int64_t c = pipe.prior()->config().c, c_cond = pipe.prior()->config().c_cond;
    auto g = make_generator(5);
    const auto path = write_lora(
        "parts", {{"text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight",
                   torch::randn({2, hidden}, g)},
                  {"text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight",
                   torch::randn({hidden, 2}, g)},
                  {"prior.blocks.5.kv_mapper.1.lora_A.weight", torch::randn({2, c_cond}, g)},
                  {"prior.blocks.5.kv_mapper.1.lora_B.weight", torch::randn({c, 2}, g)}});
    pipe.load_lora_weights(lora_file(), "a", 0.7);
    pipe.load_lora_weights(path, "parts");
    auto ref = lora_reference();
    const auto unfused = prior_forward(pipe, ref);
    const auto ids = torch::tensor(std::vector<int64_t>{1, 3, 5, 2}).unsqueeze(0);
    const auto encode = [&] {
        c10::InferenceMode guard;
        return pipe.text_encoder()->forward(ids).last_hidden_state;
    };
    const auto unfused_text = encode();
    const auto q1 = "encoder.layers.1.self_attn.q_proj.weight";
    const auto k1 = "encoder.layers.1.self_attn.k_proj.weight";
    const auto kv5 = "blocks.5.kv_mapper.1.weight";
    const auto q1_before = pipe.text_encoder()->named_parameters()[q1].clone();
    const auto kv5_before = pipe.prior()->named_parameters()[kv5].clone();
    const void* k1_data = pipe.text_encoder()->named_parameters()[k1].data_ptr();

    pipe.fuse_lora();
    EXPECT_FALSE(torch::equal(pipe.text_encoder()->named_parameters()[q1], q1_before));
    EXPECT_FALSE(torch::equal(pipe.prior()->named_parameters()[kv5], kv5_before));
    EXPECT_EQ(packed_projections(pipe).first, all - 1) << "after fuse_lora: text layer 1 apart";
    EXPECT_EQ(test::attention_projection_layout(*pipe.prior()).packed,
              test::attention_projection_layout(*pipe.prior()).attention)
        << "the prior's fully fused q, k, v packed again";
    EXPECT_FALSE(test::stored_back_to_back(*pipe.prior(), "kv_mapper.1.weight"));
    EXPECT_EQ(pipe.text_encoder()->named_parameters()[k1].data_ptr(), k1_data)
        << "an unfused layer of a partly fused group is not copied";
    EXPECT_TRUE(all_close("fused", prior_forward(pipe, ref), unfused, scaled_tol(unfused, 1e-4)));
    EXPECT_TRUE(
        all_close("text encoder fused", encode(), unfused_text, scaled_tol(unfused_text, 1e-4)));

    pipe.unfuse_lora();
    EXPECT_EQ(packed_projections(pipe).first, all) << "after unfuse_lora";
    EXPECT_TRUE(test::stored_back_to_back(*pipe.prior(), "kv_mapper.1.weight"));
    EXPECT_TRUE(torch::equal(pipe.text_encoder()->named_parameters()[q1], q1_before));
    EXPECT_TRUE(torch::equal(pipe.prior()->named_parameters()[kv5], kv5_before));

    // Fuse, then unload (baking the LoRA in): the originals go, so every group packs again.
    pipe.fuse_lora();
    const auto baked = prior_forward(pipe, ref);
    pipe.unload_lora_weights();
    EXPECT_EQ(packed_projections(pipe).first, all) << "fused, then unloaded";
    EXPECT_TRUE(test::stored_back_to_back(*pipe.prior(), "kv_mapper.1.weight"));
    EXPECT_TRUE(
        all_close("baked in, packed", prior_forward(pipe, ref), baked, scaled_tol(baked, 1e-6)));
    EXPECT_TRUE(all_close("baked in, text encoder", encode(), unfused_text,
                          scaled_tol(unfused_text, 1e-4)));
}

TEST(Lora, FuseThenUnloadKeepsFusedWeights) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    pipe.load_lora_weights(lora_file());
    const auto with_lora = prior_forward(pipe, ref);
    pipe.fuse_lora();
    pipe.unload_lora_weights();
    EXPECT_TRUE(all_close("fused + unloaded", prior_forward(pipe, ref), with_lora,
                          scaled_tol(with_lora, 1e-4)));
}

TEST(Lora, DisableEnableAndDelete) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    const auto base = prior_forward(pipe, ref);
    pipe.load_lora_weights(lora_file(), "a");
    const auto with_lora = prior_forward(pipe, ref);
    pipe.disable_lora();
    EXPECT_TRUE(torch::equal(prior_forward(pipe, ref), base));
    pipe.enable_lora();
    EXPECT_TRUE(torch::equal(prior_forward(pipe, ref), with_lora));
    pipe.set_adapters({"a"}, {0.0});
    EXPECT_TRUE(torch::equal(prior_forward(pipe, ref), base));
    pipe.delete_adapters({"a"});
    EXPECT_TRUE(pipe.lora_adapters().empty());
    EXPECT_TRUE(torch::equal(prior_forward(pipe, ref), base));
}

// ------------------------------------------------------------------------------ adapters

TEST(Lora, TwoAdaptersWithWeightsAddUp) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    pipe.load_lora_weights(lora_file(), "a");
    // "b" holds the same tensors as "a", so 0.3 a + 0.7 b == a.
    const auto b_path = write_lora("copy", fixture_tensors([](const std::string& k) { return k; }));
    pipe.load_lora_weights(b_path, "b");
    EXPECT_EQ(pipe.lora_adapters(), (std::vector<std::string>{"a", "b"}));

    pipe.set_adapters({"a"}, {1.0});
    const auto a_only = prior_forward(pipe, ref);
    pipe.set_adapters({"a", "b"}, {0.3, 0.7});
    EXPECT_TRUE(all_close("a*0.3 + b*0.7 (b == a)", prior_forward(pipe, ref), a_only,
                          scaled_tol(a_only, 1e-5)));
    pipe.set_adapters({"b", "a"}, {0.25});  // one weight for all
    const auto half = prior_forward(pipe, ref);
    pipe.set_adapters({"a"}, {0.5});
    EXPECT_TRUE(all_close("0.25 a + 0.25 b == 0.5 a", half, prior_forward(pipe, ref),
                          scaled_tol(half, 1e-5)));
}

TEST(Lora, LayerSumsAdapterBranches) {
    auto g = make_generator(0);
    LoraLinear layer(6, 5);
    auto a1 = torch::randn({2, 6}, g), b1 = torch::randn({5, 2}, g);
    auto a2 = torch::randn({3, 6}, g), b2 = torch::randn({5, 3}, g);
    layer->add_adapter("one", a1, b1, /*alpha=*/4.0, /*weight=*/0.5);  // scaling 0.5 * 4 / 2
    layer->add_adapter("two", a2, b2, /*alpha=*/3.0, /*weight=*/-1.5, /*rslora=*/true);
    auto x = torch::randn({4, 6}, g);
    auto expected = torch::nn::functional::linear(x, layer->weight, layer->bias) +
                    1.0 * x.matmul(a1.t()).matmul(b1.t()) +
                    (-1.5 * 3.0 / std::sqrt(3.0)) * x.matmul(a2.t()).matmul(b2.t());
    EXPECT_TRUE(all_close("two branches", layer->forward(x), expected, 1e-5));
    // Through a torch::nn::Linear handle as well.
    torch::nn::Linear as_linear(std::shared_ptr<torch::nn::LinearImpl>(layer.ptr()));
    EXPECT_TRUE(all_close("lora_forward", lora_forward(as_linear, x), expected, 1e-5));
}

// Adapters follow the weight lazily (at forward) or on request (place_adapters).
TEST(Lora, PlaceAdaptersFollowsTheWeight) {
    auto g = make_generator(2);
    LoraLinear layer(16, 8);
    layer->add_adapter("x", torch::randn({4, 16}, g), torch::randn({8, 4}, g), 4.0);
    layer->to(torch::kBFloat16);
    EXPECT_EQ(layer->adapters()[0].down.scalar_type(), torch::kFloat32);  // not yet
    const void* before = layer->adapters()[0].up.data_ptr();
    torch::nn::Sequential model(layer);  // the layers of a model, as the pipelines pass them
    place_lora_adapters({model.ptr().get()});
    EXPECT_EQ(layer->adapters()[0].down.scalar_type(), torch::kBFloat16);
    EXPECT_EQ(layer->adapters()[0].up.scalar_type(), torch::kBFloat16);
    const void* placed = layer->adapters()[0].up.data_ptr();
    EXPECT_NE(placed, before);
    layer->place_adapters();  // already in place: nothing is copied
    EXPECT_EQ(layer->adapters()[0].up.data_ptr(), placed);
}

TEST(Lora, Bf16LayerRunsInWeightDtypeAndRestoresExactly) {
    auto g = make_generator(1);
    LoraLinear layer(16, 8);
    layer->to(torch::kBFloat16);
    auto a = torch::randn({4, 16}, g), b = torch::randn({8, 4}, g) * 0.1;
    layer->add_adapter("x", a, b, 4.0);
    EXPECT_EQ(layer->adapters()[0].down.scalar_type(), torch::kBFloat16);
    auto x = torch::randn({3, 16}, g);
    auto expected = torch::nn::functional::linear(x, layer->weight.to(torch::kFloat32),
                                                  layer->bias.to(torch::kFloat32)) +
                    x.matmul(a.t()).matmul(b.t());
    auto unfused = layer->forward(x.to(torch::kBFloat16));
    EXPECT_EQ(unfused.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(all_close("bf16 unfused", unfused.to(torch::kFloat32), expected,
                          scaled_tol(expected, 3e-2)));
    const auto w0 = layer->weight.clone();
    layer->fuse(1.0);
    EXPECT_FALSE(torch::equal(layer->weight, w0));
    EXPECT_TRUE(layer->fused());
    EXPECT_TRUE(all_close("bf16 fused", layer->forward(x.to(torch::kBFloat16)).to(torch::kFloat32),
                          expected, scaled_tol(expected, 3e-2)));
    layer->unfuse();
    EXPECT_TRUE(torch::equal(layer->weight, w0));
}

// The whole prior's output divides by |1 - b| + 1e-5 and amplifies bf16 rounding (the base model
// alone is off by ~2 at max |ref| ~ 7), so the bf16 LoRA path is compared on an attention block.
TEST(Lora, Bf16AttentionBlockOnCpu) {
    auto pipe16 = make_pipeline({torch::kCPU, torch::kBFloat16});
    auto pipe32 = make_pipeline();
    pipe16.load_lora_weights(lora_file());
    pipe32.load_lora_weights(lora_file());
    auto block16 = pipe16.prior()->blocks[2]->as<nn::AttnBlockImpl>();
    auto block32 = pipe32.prior()->blocks[2]->as<nn::AttnBlockImpl>();
    ASSERT_NE(block16, nullptr);
    auto q = std::dynamic_pointer_cast<LoraLinearImpl>(block16->attention->to_q.ptr());
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(q->adapters()[0].down.scalar_type(), torch::kBFloat16);

    auto g = make_generator(4);
    const auto x = torch::randn({2, 32, 6, 5}, g), cond = torch::randn({2, 77, 32}, g);
    c10::InferenceMode guard;
    const auto base = block32->forward(x, cond);
    pipe32.disable_lora();
    EXPECT_GT(test::max_abs_diff(block32->forward(x, cond), base), 1e-2) << "no LoRA effect";
    const auto unfused = block16->forward(x.to(torch::kBFloat16), cond.to(torch::kBFloat16));
    EXPECT_EQ(unfused.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(all_close("bf16 attention block", unfused.to(torch::kFloat32), base,
                          scaled_tol(base, 2e-2)));
    pipe16.fuse_lora();
    const auto fused = block16->forward(x.to(torch::kBFloat16), cond.to(torch::kBFloat16));
    EXPECT_TRUE(all_close("bf16 attention block fused", fused.to(torch::kFloat32), base,
                          scaled_tol(base, 2e-2)));
}

// ------------------------------------------------------------------------------ save / load

TEST(Lora, SaveLoadRoundTrip) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    pipe.load_lora_weights(lora_file(), "a", 0.8);
    const auto before = prior_forward(pipe, ref);
    const std::string dir = test::make_temp_dir("wuerstchen_lora_save");
    pipe.save_lora_weights(dir);
    auto saved = SafeTensors::open(dir + "/pytorch_lora_weights.safetensors");
    EXPECT_EQ(saved.keys(), SafeTensors::open(lora_file()).keys());
    EXPECT_EQ(saved.metadata().count("lora_adapter_metadata"), 0u);  // alpha == rank

    pipe.unload_lora_weights();
    pipe.load_lora_weights(dir, "a", 0.8);
    EXPECT_TRUE(all_close("round trip", prior_forward(pipe, ref), before, 1e-7));
}

// kohya keys carry alpha: 8 at rank 4 doubles the scaling.
Tensors kohya_tensors(bool underscore) {
    Tensors t = fixture_tensors([&](const std::string& k) {
        std::string n = replace_all(replace_all(k, "lora_A", "lora_down"), "lora_B", "lora_up");
        if (!underscore) return n;
        const std::string stem = n.substr(0, n.find(".lora_"));
        return "lora_unet_" + replace_all(stem.substr(std::string("prior.").size()), ".", "_") +
               n.substr(stem.size());
    });
    Tensors alphas;
    for (const auto& [k, v] : t)
        if (k.find(".lora_down.weight") != std::string::npos)
            alphas.emplace_back(k.substr(0, k.find(".lora_down.weight")) + ".alpha",
                                torch::tensor(8.0f));
    t.insert(t.end(), alphas.begin(), alphas.end());
    return t;
}

TEST(Lora, KohyaKeysWithAlpha) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    pipe.load_lora_weights(lora_file(), "peft", 1.0);
    const auto peft = prior_forward(pipe, ref);
    pipe.unload_lora_weights();
    for (bool underscore : {false, true}) {
        const auto path =
            write_lora(underscore ? "kohya_a1111" : "kohya_dots", kohya_tensors(underscore));
        pipe.load_lora_weights(path, "kohya", 0.5);  // 0.5 * 8 / 4 == 1
        EXPECT_TRUE(all_close(underscore ? "lora_unet_ keys" : "lora_down keys",
                              prior_forward(pipe, ref), peft, scaled_tol(peft, 1e-5)));

        // Saved with peft keys, the alpha goes into diffusers' metadata.
        const std::string saved = test::make_temp_dir("wuerstchen_lora_kohya") + "/x.safetensors";
        pipe.save_lora_weights(saved);
        EXPECT_EQ(SafeTensors::open(saved).metadata().count("lora_adapter_metadata"), 1u);
        pipe.unload_lora_weights();
        pipe.load_lora_weights(saved, "again", 0.5);
        EXPECT_TRUE(all_close("kohya saved and reloaded", prior_forward(pipe, ref), peft,
                              scaled_tol(peft, 1e-5)));
        pipe.unload_lora_weights();
    }
}

TEST(Lora, MetadataAlphaPattern) {
    auto ref = lora_reference();
    auto pipe = make_pipeline();
    pipe.load_lora_weights(lora_file(), "peft", 1.0);
    const auto peft = prior_forward(pipe, ref);
    pipe.unload_lora_weights();
    // lora_alpha 2 (scaling 0.5) except blocks.2's to_q at alpha 4: at weight 2 all layers give 1.
    std::string meta = R"({"prior.lora_alpha": 2, "prior.r": 4,
        "prior.alpha_pattern": {"blocks.2.attention.to_q": 4},
        "prior.target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})";
    pipe.load_lora_weights(
        write_lora("meta", fixture_tensors([](const std::string& k) { return k; }),
                   {{"format", "pt"}, {"lora_adapter_metadata", meta}}),
        "m", 2.0);
    const auto out = prior_forward(pipe, ref);
    EXPECT_GT(test::max_abs_diff(out, peft), 1e-4) << "alpha_pattern ignored";
    pipe.unload_lora_weights();
    meta = R"({"prior.lora_alpha": 2, "prior.r": 4})";
    pipe.load_lora_weights(
        write_lora("meta2", fixture_tensors([](const std::string& k) { return k; }),
                   {{"lora_adapter_metadata", meta}}),
        "m", 2.0);
    EXPECT_TRUE(
        all_close("metadata lora_alpha", prior_forward(pipe, ref), peft, scaled_tol(peft, 1e-5)));
}

// ------------------------------------------------------------------------------ text encoder

TEST(Lora, TextEncoderAdapters) {
    auto pipe = make_pipeline();
    auto& te = pipe.text_encoder();
    const int64_t hidden = te->config().hidden_size;
    auto g = make_generator(3);
    const auto a = torch::randn({2, hidden}, g) * 0.3, b = torch::randn({hidden, 2}, g) * 0.3;
    const auto a2 = torch::randn({2, hidden}, g) * 0.3;
    const auto b2 = torch::randn({te->config().intermediate_size, 2}, g) * 0.3;
    const auto path = write_lora(
        "te", {{"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", a},
               {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight", b},
               {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", a2},
               {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", b2},
               {"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha", torch::tensor(2.0f)}});
    const int64_t vocab = te->config().vocab_size;
    const auto ids = torch::tensor(std::vector<int64_t>{1, 3, 5, vocab - 1}).unsqueeze(0);
    c10::InferenceMode guard;
    const auto base = te->forward(ids).last_hidden_state;
    const auto q0 = te->named_parameters()["encoder.layers.0.self_attn.q_proj.weight"].clone();

    pipe.load_lora_weights(path, "te");
    const auto with_lora = te->forward(ids).last_hidden_state;
    EXPECT_GT(test::max_abs_diff(with_lora, base), 1e-3);
    pipe.fuse_lora();
    EXPECT_TRUE(all_close("text encoder fused",
                          te->named_parameters()["encoder.layers.0.self_attn.q_proj.weight"],
                          q0 + b.matmul(a), 1e-6));
    EXPECT_TRUE(all_close("text encoder fused vs unfused", te->forward(ids).last_hidden_state,
                          with_lora, scaled_tol(with_lora, 1e-4)));
    pipe.unfuse_lora();
    EXPECT_TRUE(
        torch::equal(te->named_parameters()["encoder.layers.0.self_attn.q_proj.weight"], q0));

    // Saved with transformers' names ("text_model." prefix) and reloaded.
    const std::string saved = test::make_temp_dir("wuerstchen_lora_te") + "/te.safetensors";
    pipe.save_lora_weights(saved, "te");
    EXPECT_TRUE(SafeTensors::open(saved).contains(
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"));
    pipe.unload_lora_weights();
    pipe.load_lora_weights(saved, "te");
    EXPECT_TRUE(
        all_close("text encoder round trip", te->forward(ids).last_hidden_state, with_lora, 1e-6));
}

// ------------------------------------------------------------------------------ errors

TEST(Lora, KeyMatchingNoModuleIsNamed) {
    auto pipe = make_pipeline();
    const auto a = torch::zeros({4, 32}), b = torch::zeros({32, 4});
    auto path = write_lora("nomodule", {{"prior.blocks.99.attention.to_q.lora_A.weight", a},
                                        {"prior.blocks.99.attention.to_q.lora_B.weight", b}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError, path,
                                "'prior.blocks.99.attention.to_q.lora_A.weight' matches no module");
    path = write_lora("conv", {{"prior.projection.lora_A.weight", torch::zeros({4, 16})},
                               {"prior.projection.lora_B.weight", b}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError,
                                "'prior.projection.lora_A.weight'", "Linear layers only");
    path = write_lora("unet", {{"unet.down_blocks.0.to_q.lora_A.weight", a},
                               {"prior.blocks.2.attention.to_q.lora_A.weight", a},
                               {"prior.blocks.2.attention.to_q.lora_B.weight", b}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError,
                                "'unet.down_blocks.0.to_q.lora_A.weight' matches no module");
    path = write_lora("underscore", {{"lora_unet_blocks_2_attention_to_z.lora_down.weight", a},
                                     {"lora_unet_blocks_2_attention_to_z.lora_up.weight", b}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError,
                                "'lora_unet_blocks_2_attention_to_z.lora_down.weight'",
                                "matches no Linear layer of prior");
    path = write_lora("notlora", {{"prior.blocks.2.attention.to_q.weight", b}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError,
                                "'prior.blocks.2.attention.to_q.weight' is not a LoRA tensor");
    EXPECT_TRUE(pipe.lora_adapters().empty());
}

TEST(Lora, RankAndShapeMismatchesAreNamed) {
    auto pipe = make_pipeline();
    auto path = write_lora(
        "rank", {{"prior.blocks.2.attention.to_k.lora_A.weight", torch::zeros({4, 32})},
                 {"prior.blocks.2.attention.to_k.lora_B.weight", torch::zeros({32, 3})}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError, "rank mismatch",
                                "'prior.blocks.2.attention.to_k.lora_A.weight' [4, 32] has rank 4",
                                "'prior.blocks.2.attention.to_k.lora_B.weight' [32, 3] has rank 3");
    path = write_lora("shape",
                      {{"prior.blocks.2.attention.to_k.lora_A.weight", torch::zeros({4, 31})},
                       {"prior.blocks.2.attention.to_k.lora_B.weight", torch::zeros({32, 4})}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError,
                                "'prior.blocks.2.attention.to_k.lora_A.weight' has shape [4, 31]",
                                "Linear(32 -> 32)", "expected [rank, 32]");
    path = write_lora("shape_out",
                      {{"prior.blocks.2.attention.to_k.lora_A.weight", torch::zeros({4, 32})},
                       {"prior.blocks.2.attention.to_k.lora_B.weight", torch::zeros({30, 4})}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError,
                                "'prior.blocks.2.attention.to_k.lora_B.weight' has shape [30, 4]",
                                "expected [32, rank]");
    path = write_lora("partner",
                      {{"prior.blocks.2.attention.to_k.lora_B.weight", torch::zeros({32, 4})}});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError,
                                "'prior.blocks.2.attention.to_k.lora_B.weight' has no lora_A");
    // One bad key among good ones: nothing is applied.
    auto tensors = fixture_tensors([](const std::string& k) { return k; });
    tensors.emplace_back("prior.blocks.5.kv_mapper.1.lora_A.weight", torch::zeros({2, 7}));
    tensors.emplace_back("prior.blocks.5.kv_mapper.1.lora_B.weight", torch::zeros({32, 2}));
    path = write_lora("mixed", tensors);
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(path), WeightError,
                                "'prior.blocks.5.kv_mapper.1.lora_A.weight' has shape [2, 7]");
    EXPECT_TRUE(pipe.lora_adapters().empty());
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(data_path("lora/absent")), IoError,
                                "lora/absent");
}

TEST(Lora, AdapterNameErrors) {
    auto pipe = make_pipeline();
    pipe.load_lora_weights(lora_file());
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.load_lora_weights(lora_file()), InvalidArgument,
                                "adapter 'default' is already loaded");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.set_adapters({"default", "nope"}), InvalidArgument,
                                "unknown adapter 'nope'", "loaded: 'default'");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.set_adapters({"default"}, {1.0, 2.0}), InvalidArgument,
                                "1 adapter names but 2 weights");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.fuse_lora(1.0, {"nope"}), InvalidArgument,
                                "unknown adapter 'nope'");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.save_lora_weights("/tmp/x.safetensors", "nope"),
                                InvalidArgument, "unknown adapter 'nope'");
    pipe.fuse_lora();
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.delete_adapters({"default"}), InvalidArgument,
                                "adapter 'default' is fused");
    pipe.load_lora_weights(lora_file(), "");  // auto-named
    EXPECT_EQ(pipe.lora_adapters(), (std::vector<std::string>{"default", "default_1"}));
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.save_lora_weights("/tmp/x.safetensors"), InvalidArgument,
                                "several adapters are loaded");
}

// ------------------------------------------------------------------------------ CUDA

// fp32 on CUDA against the CPU references, without TF32 (test_util.h, NoTf32).
TEST(Lora, CudaMatchesDiffusers) {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
    test::NoTf32 no_tf32;
    auto ref = lora_reference();
    auto pipe = make_pipeline({torch::kCUDA, torch::kFloat32});
    pipe.load_lora_weights(lora_file());
    auto expected = ref_tensor(ref, "forward_lora_scale_1");
    EXPECT_TRUE(all_close("cuda fp32 forward", prior_forward(pipe, ref), expected,
                          scaled_tol(expected, 1e-4)));
    expected = ref_tensor(ref, "lora_scale_1");
    EXPECT_TRUE(
        all_close("cuda lora_scale_1", run(pipe).cpu(), expected, scaled_tol(expected, 1e-3)));
    const auto base = snapshot(pipe);
    pipe.fuse_lora(0.5);
    expected = ref_tensor(ref, "lora_fused_0.5");
    EXPECT_TRUE(
        all_close("cuda lora_fused_0.5", run(pipe).cpu(), expected, scaled_tol(expected, 1e-3)));
    pipe.unfuse_lora();
    for (const auto& [key, value] : snapshot(pipe))
        EXPECT_TRUE(torch::equal(value, base.at(key))) << key << " not restored";
}

// Half precision on an attention block (see Bf16AttentionBlockOnCpu), against fp32 on the CPU.
TEST(Lora, CudaHalfAndBf16AttentionBlock) {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
    auto pipe32 = make_pipeline();
    pipe32.load_lora_weights(lora_file());
    auto g = make_generator(4);
    const auto x = torch::randn({2, 32, 6, 5}, g), cond = torch::randn({2, 77, 32}, g);
    torch::Tensor expected;
    {
        c10::InferenceMode guard;
        expected = pipe32.prior()->blocks[2]->as<nn::AttnBlockImpl>()->forward(x, cond);
    }
    for (auto dtype : {torch::kFloat16, torch::kBFloat16}) {
        const std::string name = std::string("cuda ") + dtype_label(dtype) + " attention block";
        auto pipe = make_pipeline({torch::kCUDA, dtype});
        pipe.load_lora_weights(lora_file());
        auto* block = pipe.prior()->blocks[2]->as<nn::AttnBlockImpl>();
        const auto xs = x.to(torch::kCUDA, dtype), cs = cond.to(torch::kCUDA, dtype);
        const double rel = dtype == torch::kFloat16 ? 5e-3 : 2e-2;
        torch::Tensor unfused, fused;
        const auto base = snapshot(pipe);
        {
            c10::InferenceMode guard;
            unfused = block->forward(xs, cs).to(torch::kCPU, torch::kFloat32);
        }
        pipe.fuse_lora();
        {
            c10::InferenceMode guard;
            fused = block->forward(xs, cs).to(torch::kCPU, torch::kFloat32);
        }
        pipe.unfuse_lora();
        EXPECT_TRUE(all_close(name, unfused, expected, scaled_tol(expected, rel)));
        EXPECT_TRUE(all_close(name + " fused", fused, expected, scaled_tol(expected, rel)));
        for (const auto& [key, value] : snapshot(pipe))
            EXPECT_TRUE(torch::equal(value, base.at(key))) << name << " " << key;
    }
}

TEST(Lora, CudaOffloadFollowsDevice) {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
    test::NoTf32 no_tf32;
    auto ref = lora_reference();
    LoadOptions options{torch::kCUDA, torch::kFloat32, /*offload=*/true};
    auto pipe = make_pipeline(options);
    pipe.load_lora_weights(lora_file());
    const auto e = ref_tensor(ref, "lora_scale_1");
    EXPECT_TRUE(all_close("offload pipeline", run(pipe).cpu(), e, scaled_tol(e, 1e-3)));
    EXPECT_TRUE(all_close("offload pipeline again", run(pipe).cpu(), e, scaled_tol(e, 1e-3)));
}

}  // namespace
}  // namespace wuerstchen
