// Sequential offload's bookkeeping, the offload options' validation, the pipelines' stage entry
// points (encode_prompt, decode_latents) and the CUDA-graph cache's CPU behaviour.
//
// Sequential offload moves blocks between the CPU and a GPU; here the offloader is told to make
// its copies on the CPU as well (copy_on_same_device), which runs the same swap / prefetch /
// release logic without streams. The forward must then be bit-identical (same kernels on copies
// of the same weights), every unit must have run on a copy, exactly the running unit and the
// prefetched next one may hold copies at once, and every parameter must get its original tensor
// back, also after an exception.

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "offload.h"
#include "reference_cases.h"
#include "step_graphs.h"
#include "test_util.h"
#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/prior_pipeline.h"

namespace wuerstchen {
namespace {

using test::data_path;

std::vector<const void*> storage_of(const torch::nn::Module& m) {
    std::vector<const void*> out;
    for (const auto& p : m.parameters()) out.push_back(p.data_ptr());
    for (const auto& b : m.buffers()) out.push_back(b.data_ptr());
    return out;
}

// Delegates to the offloader and checks, inside each unit's forward, that the unit's weights
// are copies (not their home storage). Optionally throws before unit `throw_at`.
class Spy final : public BlockHook {
public:
    Spy(SequentialOffload& inner, std::vector<torch::nn::Module*> units, int throw_at = -1)
        : inner_(inner), throw_at_(throw_at) {
        for (auto* u : units)
            for (const auto& p : u->parameters()) home_.insert(p.data_ptr());
    }
    void before(const torch::nn::Module& unit) override {
        if (seen_ == throw_at_) throw std::runtime_error("stop");
        inner_.before(unit);
        for (const auto& p : unit.parameters())
            if (home_.count(p.data_ptr()) != 0) ++on_home_;
        ++seen_;
    }
    void after(const torch::nn::Module& unit) override { inner_.after(unit); }
    int seen() const { return seen_; }
    int on_home() const { return on_home_; }

private:
    SequentialOffload& inner_;
    std::set<const void*> home_;
    int throw_at_;
    int seen_ = 0;
    int on_home_ = 0;
};

// Runs `forward` plain and with a copying sequential offloader (twice: the second pass starts
// from the unit prefetched at the end of the first), checking the invariants above.
template <typename Holder, typename Forward>
void check_sequential(Holder& model, const std::string& what, Forward forward) {
    c10::InferenceMode inference;
    const auto before = storage_of(*model);
    const torch::Tensor expected = forward();
    const auto units = model->offload_units();
    ASSERT_FALSE(units.empty());
    {
        SequentialOffload offload(*model, units, torch::kCPU, /*copy_on_same_device=*/true);
        Spy spy(offload, units);
        model->block_hook = &spy;
        const torch::Tensor first = forward();
        const torch::Tensor second = forward();
        model->block_hook = nullptr;
        EXPECT_TRUE(torch::equal(first, expected)) << what << ": first pass differs";
        EXPECT_TRUE(torch::equal(second, expected)) << what << ": second pass differs";
        EXPECT_EQ(spy.seen(), 2 * static_cast<int>(units.size())) << what;
        EXPECT_EQ(spy.on_home(), 0) << what << ": a unit ran on its home weights";
        // The unit running and the next one, prefetched (on CUDA a third may still be
        // finishing on the device while the host moves on).
        EXPECT_EQ(offload.max_units_on_device(), 2) << what;
        EXPECT_GE(offload.unit_copies(), 2 * static_cast<int64_t>(units.size())) << what;
        std::cout << "[ offload ] " << what << ": " << units.size() << " units, "
                  << offload.unit_copies() << " unit copies over two forwards, at most "
                  << offload.max_units_on_device() << " at once\n";
    }
    EXPECT_EQ(storage_of(*model), before) << what << ": weights not restored";
}

// The models are loaded as for offloading (test::unpacked_load): the condition mappers stay
// unpacked, so each block maps its own condition from its unit's copy (packed ones would be read
// where they are).
TEST(SequentialOffload, PriorForwardUnchangedAndRestored) {
    auto prior = load_prior(data_path("tiny-wuerstchen-prior/prior"), test::unpacked_load());
    const auto& cfg = prior->config();
    EXPECT_EQ(prior->offload_units().size(), static_cast<size_t>(3 * cfg.depth));
    const auto x = torch::randn({2, cfg.c_in, 6, 6});
    const auto r = torch::tensor({0.7f, 0.2f});
    const auto c = torch::randn({2, 77, cfg.c_cond});
    check_sequential(prior, "prior", [&] { return prior->forward(x, r, c); });
}

TEST(SequentialOffload, DecoderForwardUnchangedAndRestored) {
    auto decoder = load_diffnext(data_path("tiny-wuerstchen/decoder"), test::unpacked_load());
    const auto& cfg = decoder->config();
    size_t blocks = 0;
    for (const auto& levels : {decoder->down_blocks, decoder->up_blocks})
        for (const auto& level : *levels) blocks += level->as<torch::nn::ModuleListImpl>()->size();
    EXPECT_EQ(decoder->offload_units().size(), blocks);
    const int64_t m = decoder->size_multiple();
    const auto x = torch::randn({1, cfg.c_in, 2 * m, 2 * m});
    const auto r = torch::tensor({0.5f});
    const auto effnet = torch::randn({1, cfg.effnet_embd, 3, 3});
    const auto clip = torch::randn({1, 77, cfg.clip_embd});
    check_sequential(decoder, "decoder", [&] { return decoder->forward(x, r, effnet, clip); });
}

TEST(SequentialOffload, TextEncoderUnchangedAndRestored) {
    auto te = load_clip_text_model(data_path("tiny-wuerstchen/text_encoder"), LoadOptions{});
    EXPECT_EQ(te->offload_units().size(), static_cast<size_t>(te->config().num_hidden_layers));
    const auto ids = torch::randint(0, te->config().vocab_size, {2, 77}, torch::kLong);
    check_sequential(te, "text encoder", [&] { return te->forward(ids).last_hidden_state; });
}

TEST(SequentialOffload, UnitsAndResidentPartitionTheWeights) {
    auto prior = load_prior(data_path("tiny-wuerstchen-prior/prior"));
    std::set<const void*> in_units;
    for (auto* u : prior->offload_units())
        for (const auto& p : u->parameters()) EXPECT_TRUE(in_units.insert(p.data_ptr()).second);
    // The rest (projection, cond_mapper, out) is what stays resident: present and disjoint.
    size_t rest = 0;
    for (const auto& p : prior->parameters()) rest += in_units.count(p.data_ptr()) == 0;
    EXPECT_GT(rest, 0u);
    EXPECT_EQ(in_units.size() + rest, prior->parameters().size());
}

TEST(SequentialOffload, RestoresWeightsWhenTheForwardThrows) {
    auto prior = load_prior(data_path("tiny-wuerstchen-prior/prior"));
    const auto& cfg = prior->config();
    const auto before = storage_of(*prior);
    c10::InferenceMode inference;
    const auto x = torch::randn({1, cfg.c_in, 4, 4});
    const auto r = torch::tensor({0.5f});
    const auto c = torch::randn({1, 77, cfg.c_cond});
    {
        const auto units = prior->offload_units();
        SequentialOffload offload(*prior, units, torch::kCPU, /*copy_on_same_device=*/true);
        Spy spy(offload, units, /*throw_at=*/4);
        prior->block_hook = &spy;
        EXPECT_THROW(prior->forward(x, r, c), std::runtime_error);
        prior->block_hook = nullptr;
        // Unit 4 (prefetched by before(3)) still holds its copy here.
        const auto unit4 = prior->offload_units()[4]->parameters();
        ASSERT_FALSE(unit4.empty());
        EXPECT_EQ(std::count(before.begin(), before.end(), unit4[0].data_ptr()), 0);
    }
    EXPECT_EQ(storage_of(*prior), before);
}

// StageScope sets the model's hook for the stage and clears it after, also on an exception.
TEST(SequentialOffload, StageScopeSetsAndClearsTheHook) {
    auto prior = load_prior(data_path("tiny-wuerstchen-prior/prior"));
    {
        const auto scope = stage_scope(prior, torch::kCPU, OffloadMode::sequential);
        EXPECT_NE(prior->block_hook, nullptr);
    }
    EXPECT_EQ(prior->block_hook, nullptr);
    try {
        const auto scope = stage_scope(prior, torch::kCPU, OffloadMode::sequential);
        throw std::runtime_error("stop");
    } catch (const std::runtime_error&) {
    }
    EXPECT_EQ(prior->block_hook, nullptr);
    {
        const auto scope = stage_scope(prior, torch::kCPU, OffloadMode::model);
        EXPECT_EQ(prior->block_hook, nullptr);  // model offload moves the whole model instead
    }
}

TEST(OffloadOptions, BothModesAreRefused) {
    LoadOptions o;
    o.offload = true;
    o.sequential_offload = true;
    WUERSTCHEN_EXPECT_THROW_MSG(offload_mode("PriorPipeline", o), InvalidArgument, "PriorPipeline",
                                "`offload` and `sequential_offload`");
    WUERSTCHEN_EXPECT_THROW_MSG(
        PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"), o), InvalidArgument,
        "PriorPipeline", "`offload` and `sequential_offload`");
    WUERSTCHEN_EXPECT_THROW_MSG(DecoderPipeline::from_pretrained(data_path("tiny-wuerstchen"), o),
                                InvalidArgument, "DecoderPipeline",
                                "`offload` and `sequential_offload`");
    o.offload = false;
    EXPECT_EQ(offload_mode("x", o), OffloadMode::none);  // no effect on the CPU
}

// On the CPU, sequential offload and CUDA graphs are documented no-ops: same numbers.
TEST(OffloadOptions, CpuIgnoresSequentialOffloadAndGraphs) {
    LoadOptions o;
    o.sequential_offload = true;
    o.cuda_graphs = true;
    auto pipe = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"), o);
    const auto ref = test::reference("pipeline_combined_seed42");
    EXPECT_TRUE(test::all_close("cpu sequential_offload + cuda_graphs combined_seed42",
                                pipe(test::combined_seed42_options()).images,
                                test::ref_tensor(ref, "images"), 1e-3));
}

TEST(StageEntryPoints, EncodePromptFeedsThePriorLikePrompts) {
    auto pipe = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"));
    const PriorOptions with_text = test::prior_seed0_options();
    PriorOptions with_embeds = with_text;
    with_embeds.prompts.clear();
    with_embeds.prompt_embeds = pipe.encode_prompt(with_text.prompts);
    with_embeds.negative_prompt_embeds = pipe.encode_prompt({""});
    EXPECT_EQ(with_embeds.prompt_embeds.sizes(),
              (std::vector<int64_t>{1, 77, pipe.prior()->config().c_cond}));
    EXPECT_TRUE(torch::equal(pipe(with_text).image_embeddings,
                             pipe(with_embeds).image_embeddings));
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.encode_prompt({}), InvalidArgument, "PriorPipeline",
                                "`prompts`");
}

TEST(StageEntryPoints, DecodeLatentsEqualsThePipelineImages) {
    auto pipe = DecoderPipeline::from_pretrained(data_path("tiny-wuerstchen"));
    const auto ref = test::reference("pipeline_decoder_seed22");
    DecoderOptions o = test::decoder_seed22_options(ref);
    const auto full = pipe(o);
    o.decode = false;
    const auto latents = pipe(o).latents;
    EXPECT_TRUE(torch::equal(pipe.decode_latents(latents), full.images));
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.decode_latents(torch::zeros({1, 3, 8, 8})), InvalidArgument,
                                "DecoderPipeline", "`latents`", "[1, 3, 8, 8]");
}

TEST(StepGraphs, CallsTheStepOffCuda) {
    StepGraphs graphs;
    int calls = 0;
    const auto x = torch::ones({2, 3});
    const auto out = graphs.run({x}, "k", [&](const std::vector<torch::Tensor>& in) {
        ++calls;
        return in[0] * 2;
    });
    EXPECT_EQ(calls, 1);
    EXPECT_TRUE(torch::equal(out, x * 2));
    EXPECT_EQ(graphs.size(), 0u);  // nothing captured for CPU inputs
}

TEST(StepGraphs, KeysAreExact) {
    EXPECT_NE(guidance_key(true, 4.0), guidance_key(true, 4.0000000000000009));
    EXPECT_EQ(guidance_key(false, 4.0), guidance_key(false, 7.0));
    EXPECT_NE(guidance_key(true, 1.5), guidance_key(false, 1.5));
}

// A graph replays the weights it captured: the fingerprint must move with anything a replay
// would get wrong (moved or replaced weights, LoRA adapters and their weights / switches).
TEST(StepGraphs, FingerprintFollowsWeightsAndLora) {
    auto pipe = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"));
    auto& prior = *pipe.prior();
    const std::string base = weights_fingerprint(prior);
    EXPECT_EQ(weights_fingerprint(prior), base);
    pipe.load_lora_weights(data_path("lora/tiny-prior-lora"), "a", 1.0);
    const std::string with_lora = weights_fingerprint(prior);
    EXPECT_NE(with_lora, base);
    pipe.set_adapters({"a"}, {0.5});
    const std::string half = weights_fingerprint(prior);
    EXPECT_NE(half, with_lora);
    pipe.disable_lora();
    EXPECT_NE(weights_fingerprint(prior), half);
    pipe.enable_lora();
    EXPECT_EQ(weights_fingerprint(prior), half);
    pipe.fuse_lora();
    const std::string fused = weights_fingerprint(prior);
    EXPECT_NE(fused, half);
    pipe.unfuse_lora();
    EXPECT_EQ(weights_fingerprint(prior), half);
    pipe.unload_lora_weights();
    EXPECT_EQ(weights_fingerprint(prior), base);
    // Another dtype (new tensors) and a buffer of its own.
    prior.to(torch::kFloat64);
    EXPECT_NE(weights_fingerprint(prior), base);
    const std::string f64 = weights_fingerprint(prior);
    prior.register_buffer("extra", torch::zeros({2}));
    EXPECT_NE(weights_fingerprint(prior), f64);
}

// The walks that replaced Module's recursive listings (which build every dotted name) list the
// same tensors in the same order.
TEST(ModuleWalk, SameTensorsInTheSameOrderAsModuleListings) {
    auto pipe = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"));
    pipe.load_lora_weights(data_path("lora/tiny-prior-lora"), "a", 1.0);
    for (torch::nn::Module* module : std::vector<torch::nn::Module*>{
             pipe.prior().ptr().get(), pipe.text_encoder().ptr().get()}) {
        std::vector<torch::Tensor> listed = module->parameters();
        const auto buffers = module->buffers();
        listed.insert(listed.end(), buffers.begin(), buffers.end());
        const auto walked = module_tensors(*module);
        ASSERT_EQ(walked.size(), listed.size());
        ASSERT_FALSE(walked.empty());
        for (size_t i = 0; i < walked.size(); ++i) EXPECT_TRUE(walked[i].is_same(listed[i])) << i;
        EXPECT_EQ(module_dtype(*module), listed[0].scalar_type());
        EXPECT_EQ(module_device(*module), listed[0].device());
    }
    // A module whose first parameters are not floating point: the first floating one's dtype.
    torch::nn::Module holder;
    holder.register_parameter("ids", torch::zeros({2}, torch::kInt64), /*requires_grad=*/false);
    holder.register_module("child", torch::nn::Linear(2, 2))->to(torch::kFloat64);
    EXPECT_EQ(module_dtype(holder), torch::kFloat64);
    EXPECT_EQ(module_dtype(torch::nn::Module()), torch::kFloat32);
}

}  // namespace
}  // namespace wuerstchen
