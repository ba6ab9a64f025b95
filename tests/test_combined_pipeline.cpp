// CombinedPipeline: the combined_seed42 reference through both ways of loading, one generator
// through both stages, and the two-folder layout giving the same result as the combined save.

#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <limits>
#include <string>

#include "reference_cases.h"
#include "test_util.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/error.h"

namespace wuerstchen {
namespace {

TEST(CombinedPipeline, CombinedSaveMatchesSeed42Reference) {
    CombinedPipeline pipe = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    const CombinedOutput out = pipe(test::combined_seed42_options());
    const SafeTensors ref = test::reference("pipeline_combined_seed42");
    EXPECT_TRUE(test::all_close("combined_seed42 images", out.images, test::ref_tensor(ref, "images"), 1e-3));
    EXPECT_EQ(out.image_embeddings.sizes(), torch::IntArrayRef({1, 16, 6, 9}));
}

// A program that loads and runs everything inside c10::InferenceMode: the parameters are
// inference tensors then, which autograd's view tracking refuses (the packed layers' views), and
// which carry no version counter (the effnet fold declines them and maps per level). Both
// layouts give the reference images.
TEST(CombinedPipeline, LoadedAndRunInInferenceMode) {
    const SafeTensors ref = test::reference("pipeline_combined_seed42");
    for (const bool channels_last : {false, true}) {
        c10::InferenceMode guard;
        LoadOptions options;
        options.channels_last = channels_last;
        CombinedPipeline pipe =
            CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"), options);
        ASSERT_TRUE(pipe.prior_pipeline().prior()->parameters()[0].is_inference());
        const CombinedOutput out = pipe(test::combined_seed42_options());
        EXPECT_TRUE(test::all_close(std::string("combined_seed42 images in InferenceMode") +
                                        (channels_last ? ", channels-last" : ""),
                                    out.images, test::ref_tensor(ref, "images"), 1e-3));
    }
}

// LoadOptions::channels_last: every 4-D weight of the three models in NHWC order (which differs
// from NCHW for the kernels wider than 1x1 with more than one input channel: the decoder's and
// VQGAN's resampling convolutions); the same images (the reference within 1e-3, the default
// layout within rounding); outputs in NCHW order.
TEST(CombinedPipeline, ChannelsLastMatchesSeed42Reference) {
    LoadOptions options;
    options.channels_last = true;
    CombinedPipeline pipe =
        CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"), options);
    int checked = 0;
    for (torch::nn::Module* model :
         {static_cast<torch::nn::Module*>(pipe.prior_pipeline().prior().get()),
          static_cast<torch::nn::Module*>(pipe.decoder_pipeline().decoder().get()),
          static_cast<torch::nn::Module*>(pipe.decoder_pipeline().vqgan().get())}) {
        for (const auto& p : model->named_parameters()) {
            const torch::Tensor& w = p.value();
            if (w.dim() != 4) continue;
            EXPECT_TRUE(w.is_contiguous(at::MemoryFormat::ChannelsLast)) << p.key();
            if (w.size(1) > 1 && w.size(2) * w.size(3) > 1) {
                EXPECT_FALSE(w.is_contiguous()) << p.key();
                ++checked;
            }
        }
    }
    EXPECT_GT(checked, 3);

    const CombinedOutput out = pipe(test::combined_seed42_options());
    const SafeTensors ref = test::reference("pipeline_combined_seed42");
    EXPECT_TRUE(test::all_close("combined_seed42 images, channels-last", out.images,
                                test::ref_tensor(ref, "images"), 1e-3));
    EXPECT_TRUE(out.images.is_contiguous());
    EXPECT_TRUE(out.image_embeddings.is_contiguous());

    CombinedPipeline nchw =
        CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    const CombinedOutput expected = nchw(test::combined_seed42_options());
    EXPECT_TRUE(test::all_close("channels-last vs NCHW image_embeddings", out.image_embeddings,
                                expected.image_embeddings,
                                test::scaled_tol(expected.image_embeddings, 1e-4)));
    EXPECT_TRUE(test::all_close("channels-last vs NCHW images", out.images, expected.images, 1e-4));
}

TEST(CombinedPipeline, TwoFoldersEqualCombinedSave) {
    CombinedPipeline two = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-prior"),
                                                             test::data_path("tiny-wuerstchen"));
    CombinedPipeline one = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    const CombinedOutput a = two(test::combined_seed42_options());
    const CombinedOutput b = one(test::combined_seed42_options());
    EXPECT_TRUE(test::all_close("two folders vs combined save", a.images, b.images, 0.0));
}

// A moved-from pipeline refuses every call with InvalidArgument (before, some calls dereferenced
// the moved graph caches) and works again once assigned.
TEST(CombinedPipeline, MovedFromRefusesCallsUntilAssigned) {
    CombinedPipeline pipe =
        CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedPipeline taken = std::move(pipe);
    PriorPipeline& prior = pipe.prior_pipeline();
    DecoderPipeline& decoder = pipe.decoder_pipeline();
    EXPECT_THROW(pipe(test::combined_seed42_options()), InvalidArgument);
    EXPECT_THROW(pipe.clear_graphs(), InvalidArgument);
    EXPECT_THROW(prior(PriorOptions().prompt("a cat")), InvalidArgument);
    EXPECT_THROW(prior.encode_prompt({"a cat"}), InvalidArgument);
    EXPECT_THROW(prior.captured_graphs(), InvalidArgument);
    EXPECT_THROW(prior.captured_text_graphs(), InvalidArgument);
    EXPECT_THROW(prior.lora_adapters(), InvalidArgument);
    EXPECT_THROW(prior.enable_lora(), InvalidArgument);
    EXPECT_THROW(prior.load_lora_weights("missing.safetensors"), InvalidArgument);
    EXPECT_THROW(decoder.encode_prompt({"a cat"}), InvalidArgument);
    EXPECT_THROW(decoder.decode_latents(torch::zeros({1, 4, 8, 8})), InvalidArgument);
    EXPECT_THROW(decoder.captured_graphs(), InvalidArgument);
    EXPECT_THROW(decoder.clear_graphs(), InvalidArgument);
    EXPECT_THROW(decoder.latent_shape(1, 4, 4), InvalidArgument);
    try {
        pipe(test::combined_seed42_options());
        ADD_FAILURE() << "a moved-from pipeline ran";
    } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("moved from"), std::string::npos) << e.what();
    }
    pipe = std::move(taken);
    const SafeTensors ref = test::reference("pipeline_combined_seed42");
    EXPECT_TRUE(test::all_close("combined_seed42 after assignment",
                                pipe(test::combined_seed42_options()).images,
                                test::ref_tensor(ref, "images"), 1e-3));
}

TEST(CombinedPipeline, CallerGeneratorFlowsThroughBothStages) {
    CombinedPipeline pipe = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedOptions o = test::combined_seed42_options();
    o.seed.reset();
    at::Generator g = make_generator(42);
    o.generator = &g;
    const CombinedOutput a = pipe(o);
    const SafeTensors ref = test::reference("pipeline_combined_seed42");
    EXPECT_TRUE(test::all_close("combined_seed42 via generator", a.images, test::ref_tensor(ref, "images"), 1e-3));
    // The generator advanced: a second call with it gives different images.
    const CombinedOutput b = pipe(o);
    EXPECT_GT(test::max_abs_diff(a.images, b.images), 1e-3);
}

// Without callbacks one worker draws both stages' noise ahead (the decoder's while the prior
// runs); with callbacks every draw is inline. Both leave a caller's generator in the same state
// and give the same images, with several prompts, images per prompt and given prior latents.
TEST(CombinedPipeline, DrawsAheadEqualInlineDraws) {
    CombinedPipeline pipe = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedOptions o = test::combined_seed42_options();
    o.seed.reset();
    o.prompts = {"horse", "a cozy cabin"};
    o.num_images_per_prompt = 2;
    o.height = o.width = 128;
    for (const bool given_latents : {false, true}) {
        if (given_latents) o.latents = torch::randn({4, 16, 3, 3});
        at::Generator ahead_gen = make_generator(3);
        at::Generator inline_gen = make_generator(3);
        o.generator = &ahead_gen;
        o.prior_callback = nullptr;
        o.callback = nullptr;
        const CombinedOutput ahead = pipe(o);
        o.generator = &inline_gen;
        o.prior_callback = [](int, double, torch::Tensor&) { return true; };
        o.callback = [](int, double, torch::Tensor&) { return true; };
        const CombinedOutput inlined = pipe(o);
        const std::string what = given_latents ? "draws ahead vs inline, given latents"
                                               : "draws ahead vs inline";
        EXPECT_TRUE(test::all_close(what, ahead.images, inlined.images, 0.0));
        EXPECT_TRUE(torch::equal(randn_like_diffusers({16}, ahead_gen),
                                 randn_like_diffusers({16}, inline_gen)))
            << what << ": the generators differ after the call";
    }
}

// Options the decoder rejects after the prior has run: the decoder draws made ahead meanwhile
// are undone, so a caller's generator stands after the prior's draws, as with inline drawing.
TEST(CombinedPipeline, DecoderRejectionUndoesItsDrawsAhead) {
    CombinedPipeline pipe = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedOptions o = test::combined_seed42_options();
    o.seed.reset();
    o.decoder_timesteps = {0.5, 0.7, 0.0};  // not descending: the decoder's check
    at::Generator ahead_gen = make_generator(4);
    o.generator = &ahead_gen;
    EXPECT_THROW(pipe(o), InvalidArgument);
    at::Generator inline_gen = make_generator(4);
    o.generator = &inline_gen;
    o.prior_callback = [](int, double, torch::Tensor&) { return true; };
    EXPECT_THROW(pipe(o), InvalidArgument);
    EXPECT_TRUE(torch::equal(randn_like_diffusers({16}, ahead_gen),
                             randn_like_diffusers({16}, inline_gen)));
}

TEST(CombinedPipeline, ImagesPerPromptAndCallbacks) {
    CombinedPipeline pipe = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedOptions o = test::combined_seed42_options();
    o.prompts = {"horse", "a cozy cabin"};
    o.num_images_per_prompt = 2;
    o.height = o.width = 128;
    int prior_steps = 0, decoder_steps = 0;
    o.prior_callback = [&](int, double, torch::Tensor&) { return ++prior_steps > 0; };
    o.callback = [&](int, double, torch::Tensor&) { return ++decoder_steps > 0; };
    const CombinedOutput out = pipe(o);
    EXPECT_EQ(out.images.sizes(), torch::IntArrayRef({4, 3, 128, 128}));
    EXPECT_EQ(prior_steps, 3);
    EXPECT_EQ(decoder_steps, 2);
}

TEST(CombinedPipeline, CancelInEitherStageLeavesPipelineUsable) {
    CombinedPipeline pipe = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedOptions o = test::combined_seed42_options();
    o.callback = [](int, double, torch::Tensor&) { return false; };
    EXPECT_THROW(pipe(o), Cancelled);
    o.callback = nullptr;
    o.prior_callback = [](int step, double, torch::Tensor&) { return step < 1; };
    EXPECT_THROW(pipe(o), Cancelled);
    const CombinedOutput out = pipe(test::combined_seed42_options());
    const SafeTensors ref = test::reference("pipeline_combined_seed42");
    EXPECT_TRUE(test::all_close("combined_seed42 after cancel", out.images, test::ref_tensor(ref, "images"), 1e-3));
}

// Prior text states with one negative prompt per prompt and decoder guidance: the decoder gets
// "" for each image, so its negatives line up (it refused the call before).
TEST(CombinedPipeline, PromptEmbedsWithNegativesPerPromptAndDecoderGuidance) {
    CombinedPipeline pipe =
        CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedOptions o = test::combined_seed42_options();
    o.height = o.width = 128;
    o.num_images_per_prompt = 2;
    o.negative_prompts = {"blurry", "dark"};
    o.decoder_guidance_scale = 2.0;
    o.prompts = {"horse", "a cozy cabin"};
    const CombinedOutput from_text = pipe(o);
    o.prompt_embeds = pipe.prior_pipeline().encode_prompt(o.prompts);
    o.prompts.clear();
    const CombinedOutput from_states = pipe(o);
    EXPECT_EQ(from_states.images.sizes(), torch::IntArrayRef({4, 3, 128, 128}));
    EXPECT_TRUE(test::all_close("prior stage from text states", from_states.image_embeddings,
                                from_text.image_embeddings, 1e-5));
}

TEST(CombinedPipeline, BadArguments) {
    CombinedPipeline pipe = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedOptions o = test::combined_seed42_options();
    o.height = 0;
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "height");
    o = test::combined_seed42_options();
    o.num_inference_steps = 0;
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "num_inference_steps");
    o = test::combined_seed42_options();
    o.prior_num_inference_steps = std::numeric_limits<int>::max();
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "num_inference_steps", "at most");
    WUERSTCHEN_EXPECT_THROW_MSG(CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-prior")), Error,
                                "tiny-wuerstchen-prior");
}

}  // namespace
}  // namespace wuerstchen
