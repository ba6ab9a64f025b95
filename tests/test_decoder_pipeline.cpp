// DecoderPipeline: whole calls against diffusers' WuerstchenDecoderPipeline (images and the
// latents after every step), the num_images_per_prompt draw order, cancellation and argument
// checks.

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "reference_cases.h"
#include "test_util.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"

namespace wuerstchen {
namespace {

// Images and per-step latents: 1e-3 absolute (the bound). The first step multiplies the
// model's error by 1/sqrt(alpha) ~ 50 (alpha_cumprod(1) is clamped to 1e-4) and the tiny random
// decoder drives the latents to |x| ~ 300-500, so this holds only because the r-embedding
// matches upstream to 5e-7 (see nn::r_embedding).
constexpr double kPipelineTol = 1e-3;

class DecoderPipelineTest : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        pipe_ = std::make_unique<DecoderPipeline>(
            DecoderPipeline::from_pretrained(test::data_path("tiny-wuerstchen")));
    }
    static void TearDownTestSuite() { pipe_.reset(); }

    // Runs `opt` collecting the latents after every step.
    static DecoderOutput run(DecoderOptions opt, std::vector<torch::Tensor>* steps) {
        if (steps != nullptr) {
            opt.callback = [steps](int, double, torch::Tensor& latents) {
                steps->push_back(latents.clone());
                return true;
            };
        }
        return (*pipe_)(opt);
    }

    static std::unique_ptr<DecoderPipeline> pipe_;
};
std::unique_ptr<DecoderPipeline> DecoderPipelineTest::pipe_;

void expect_case(const std::string& name, const DecoderOutput& out,
                 const std::vector<torch::Tensor>& steps, const SafeTensors& ref) {
    EXPECT_EQ(out.images.scalar_type(), torch::kFloat32);
    EXPECT_TRUE(out.images.device().is_cpu());
    EXPECT_TRUE(test::all_close(name + " images", out.images, test::ref_tensor(ref, "images"),
                                kPipelineTol));
    ASSERT_FALSE(steps.empty());
    const auto expected = test::ref_tensor(ref, "step_latents");
    EXPECT_TRUE(test::all_close(name + " step_latents", torch::stack(steps), expected, kPipelineTol));
}

TEST_F(DecoderPipelineTest, Seed22MatchesDiffusers) {
    const auto ref = test::reference("pipeline_decoder_seed22");
    std::vector<torch::Tensor> steps;
    const auto out = run(test::decoder_seed22_options(ref), &steps);
    EXPECT_EQ(out.images.sizes(), (std::vector<int64_t>{1, 3, 256, 256}));
    expect_case("decoder_seed22", out, steps, ref);
}

// Two embeddings, one prompt (upstream repeats the text per embedding), negative prompt, CFG
// with zero image embeddings on the unconditional half.
TEST_F(DecoderPipelineTest, CfgNegativeBatch2MatchesDiffusers) {
    const auto ref = test::reference("pipeline_decoder_cfg_neg_b2");
    DecoderOptions opt = test::decoder_cfg_neg_b2_options(ref);
    std::vector<torch::Tensor> steps;
    const auto out = run(opt, &steps);
    expect_case("decoder_cfg_neg_b2", out, steps, ref);

    // One prompt per embedding gives the same result as one prompt for all.
    opt.prompts = {"a lighthouse", "a lighthouse"};
    opt.negative_prompts = {"fog", "fog"};
    EXPECT_TRUE(test::all_close("decoder_cfg_neg_b2 with per-embedding prompts",
                                run(opt, nullptr).images, out.images, 1e-5));
    // The list form of the embeddings is concatenated.
    opt.image_embeddings_list = {opt.image_embeddings.slice(0, 0, 1),
                                 opt.image_embeddings.slice(0, 1, 2)};
    opt.image_embeddings = torch::Tensor();
    EXPECT_TRUE(test::all_close("decoder_cfg_neg_b2 from a list", run(opt, nullptr).images,
                                out.images, 1e-5));
}

// DecoderOptions::prompt_embeds / negative_prompt_embeds from encode_prompt stand in for the
// strings: the same calls, the same numbers as diffusers'.
TEST_F(DecoderPipelineTest, PromptEmbedsReplaceThePrompts) {
    auto& pipe = *pipe_;
    {
        const auto ref = test::reference("pipeline_decoder_seed22");
        DecoderOptions opt = test::decoder_seed22_options(ref);
        const auto embeds = pipe.encode_prompt(opt.prompts);
        EXPECT_EQ(embeds.sizes(),
                  (std::vector<int64_t>{1, 77, pipe.text_encoder()->config().hidden_size}));
        opt.prompt_embeds = embeds;
        opt.prompts = {};
        std::vector<torch::Tensor> steps;
        expect_case("decoder_seed22 from prompt_embeds", run(opt, &steps), steps, ref);
    }
    const auto ref = test::reference("pipeline_decoder_cfg_neg_b2");
    DecoderOptions opt = test::decoder_cfg_neg_b2_options(ref);
    opt.prompt_embeds = pipe.encode_prompt(opt.prompts);
    opt.negative_prompt_embeds = pipe.encode_prompt(opt.negative_prompts);
    opt.prompts = {};
    opt.negative_prompts = {};
    std::vector<torch::Tensor> steps;
    const auto out = run(opt, &steps);
    expect_case("decoder_cfg_neg_b2 from prompt embeds", out, steps, ref);
    // Text states given for the prompt only: the negative prompt is still encoded.
    DecoderOptions mixed = test::decoder_cfg_neg_b2_options(ref);
    mixed.prompt_embeds = opt.prompt_embeds;
    mixed.prompts = {};
    EXPECT_TRUE(test::all_close("decoder_cfg_neg_b2, prompt_embeds + negative_prompts",
                                run(mixed, nullptr).images, out.images, 0));
    // One negative for two per-embedding prompts.
    opt.prompt_embeds = opt.prompt_embeds.expand({2, -1, -1});
    EXPECT_TRUE(test::all_close("decoder_cfg_neg_b2, two prompt states, one negative",
                                run(opt, nullptr).images, out.images, 1e-5));
    // Repeated prompts are encoded once each; rows keep their prompt.
    DecoderOptions three = test::decoder_seed22_options(test::reference("pipeline_decoder_seed22"));
    three.image_embeddings = three.image_embeddings.repeat({3, 1, 1, 1});
    three.prompts = {"a lighthouse", "fog", "a lighthouse"};
    three.num_inference_steps = 2;
    const auto from_strings = run(three, nullptr).images;
    three.prompt_embeds = torch::cat({pipe.encode_prompt({"a lighthouse"}),
                                      pipe.encode_prompt({"fog"}),
                                      pipe.encode_prompt({"a lighthouse"})});
    three.prompts = {};
    EXPECT_TRUE(test::all_close("three embeddings, prompts a / b / a", from_strings,
                                run(three, nullptr).images, 1e-5));
}

// num_images_per_prompt = 2 with one embedding: latents [2, ...] are drawn in one call (rows are
// embedding-major), then one draw per step, so it equals (a) the embedding given twice with the
// same seed and (b) explicit latents drawn first from the same generator.
TEST_F(DecoderPipelineTest, ImagesPerPromptRepeatsEmbeddings) {
    const auto ref = test::reference("pipeline_decoder_seed22");
    DecoderOptions opt = test::decoder_seed22_options(ref);
    opt.num_images_per_prompt = 2;
    opt.num_inference_steps = 2;
    const auto two = run(opt, nullptr);
    ASSERT_EQ(two.images.size(0), 2);
    EXPECT_GT(test::max_abs_diff(two.images[0], two.images[1]), 1e-3)
        << "the two images should come from different noise";

    DecoderOptions twice = opt;
    twice.num_images_per_prompt = 1;
    twice.image_embeddings = opt.image_embeddings.repeat({2, 1, 1, 1});
    EXPECT_TRUE(
        test::all_close("n=2 vs embedding twice", run(twice, nullptr).images, two.images, 1e-6));

    at::Generator g = make_generator(22);
    const auto shape =
        pipe_->latent_shape(2, opt.image_embeddings.size(2), opt.image_embeddings.size(3));
    DecoderOptions explicit_latents = opt;
    explicit_latents.seed.reset();
    explicit_latents.latents = randn_like_diffusers(shape, g);
    explicit_latents.generator = &g;
    EXPECT_TRUE(test::all_close("n=2 vs explicit latents", run(explicit_latents, nullptr).images,
                                two.images, 1e-6));
}

TEST_F(DecoderPipelineTest, CancelThenReuse) {
    const auto ref = test::reference("pipeline_decoder_seed22");
    DecoderOptions opt = test::decoder_seed22_options(ref);
    int calls = 0;
    opt.callback = [&calls](int step, double, torch::Tensor&) {
        ++calls;
        return step < 1;
    };
    WUERSTCHEN_EXPECT_THROW_MSG((*pipe_)(opt), Cancelled, "cancelled", "step 1");
    EXPECT_EQ(calls, 2);

    std::vector<torch::Tensor> steps;
    expect_case("decoder_seed22 after a cancelled call", run(test::decoder_seed22_options(ref), &steps), steps,
                ref);
}

// A call maps its condition once: a callback that replaces a decoder parameter is refused, and
// the next call matches the reference.
TEST_F(DecoderPipelineTest, CallbackReplacingWeightsIsRefused) {
    const auto ref = test::reference("pipeline_decoder_seed22");
    DecoderOptions opt = test::decoder_seed22_options(ref);
    opt.callback = [](int, double, torch::Tensor&) {
        torch::Tensor w = test::parameters_named(*pipe_->decoder(), "clip_mapper.weight")[0];
        w.set_data(w.detach().clone());
        return true;
    };
    WUERSTCHEN_EXPECT_THROW_MSG((*pipe_)(opt), InvalidArgument, "step callback after step 0",
                                "replaced the decoder's weights");
    std::vector<torch::Tensor> steps;
    expect_case("decoder_seed22 after the refused call",
                run(test::decoder_seed22_options(ref), &steps), steps, ref);

    // A weight that the call mapped once, changed in place (clip_mapper's): refused after the
    // callback, naming the module. A new pipeline: the weight replaced above took an inference
    // tensor's data (the callback runs in inference mode), which has no version to check.
    // The effnet mappers are folded into the blocks' weights: the fold is checked too.
    auto fresh = DecoderPipeline::from_pretrained(test::data_path("tiny-wuerstchen"));
    for (const auto& [name, says] : std::vector<std::pair<std::string, std::string>>{
             {"clip_mapper.bias", "mapped by clip_mapper"},
             {"effnet_mappers.1.weight", "fold_effnet_mappers"}}) {
        SCOPED_TRACE(name);
        const torch::Tensor mapped = test::parameters_named(*fresh.decoder(), name).at(0);
        opt.callback = [&mapped](int, double, torch::Tensor&) {
            torch::NoGradGuard no_grad;
            torch::Tensor(mapped).mul_(1.0);  // a new version, the same values
            return true;
        };
        WUERSTCHEN_EXPECT_THROW_MSG(fresh(opt), InvalidArgument, "step callback after step 0",
                                    "changed the decoder's weights in place", says);
        fresh.decoder()->fold_effnet_mappers();  // folds again after the edit
    }
    EXPECT_TRUE(test::all_close("decoder_seed22 after the in-place edit was refused",
                                fresh(test::decoder_seed22_options(ref)).images,
                                test::ref_tensor(ref, "images"), kPipelineTol));
}

// Latents a callback hands back are copied: out.latents is not a view of the caller's tensor.
TEST_F(DecoderPipelineTest, CallbackLatentsAreCopied) {
    const auto ref = test::reference("pipeline_decoder_seed22");
    DecoderOptions opt = test::decoder_seed22_options(ref);
    opt.decode = false;
    torch::Tensor mine;
    opt.callback = [&mine](int, double, torch::Tensor& latents) {
        mine = torch::zeros({2, latents.size(1), latents.size(2), latents.size(3)});
        latents = mine.narrow(0, 1, 1);
        return true;
    };
    const auto out = (*pipe_)(opt);
    ASSERT_TRUE(torch::equal(out.latents, mine.narrow(0, 1, 1)));
    EXPECT_NE(out.latents.data_ptr(), mine.narrow(0, 1, 1).data_ptr());
    EXPECT_TRUE(out.latents.is_contiguous());
}

TEST_F(DecoderPipelineTest, CombinedFolderAndComponents) {
    const auto ref = test::reference("pipeline_decoder_seed22");
    auto combined = DecoderPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    EXPECT_DOUBLE_EQ(combined.latent_dim_scale(), 10.67);
    EXPECT_TRUE(test::all_close("decoder_seed22 from the combined folder",
                                combined(test::decoder_seed22_options(ref)).images,
                                test::ref_tensor(ref, "images"), kPipelineTol));

    DecoderComponents parts{pipe_->tokenizer(),        pipe_->text_encoder(),
                            pipe_->decoder(),          pipe_->vqgan(),
                            pipe_->scheduler_config(), pipe_->latent_dim_scale()};
    auto shared = DecoderPipeline::from_components(std::move(parts));
    EXPECT_TRUE(test::all_close("decoder_seed22 from components",
                                shared(test::decoder_seed22_options(ref)).images, test::ref_tensor(ref, "images"),
                                kPipelineTol));
}

TEST_F(DecoderPipelineTest, MissingComponentIsInvalidArgument) {
    DecoderComponents parts{pipe_->tokenizer(), pipe_->text_encoder(), WuerstchenDiffNeXt(nullptr),
                            pipe_->vqgan(),     pipe_->scheduler_config(), 10.67};
    WUERSTCHEN_EXPECT_THROW_MSG(DecoderPipeline::from_components(std::move(parts)),
                                InvalidArgument, "DecoderPipeline", "must all be set");
}

// A text encoder that does not fit the tokenizer or the decoder is refused when the pipeline
// is made, not at the first call.
TEST_F(DecoderPipelineTest, MismatchedTextEncoderIsInvalidArgument) {
    CLIPTextConfig config = pipe_->text_encoder()->config();
    config.vocab_size = 100;  // the tokenizer's ids go up to 624
    DecoderComponents small_vocab{pipe_->tokenizer(), CLIPTextModel(config),     pipe_->decoder(),
                                  pipe_->vqgan(),     pipe_->scheduler_config(), 10.67};
    WUERSTCHEN_EXPECT_THROW_MSG(DecoderPipeline::from_components(std::move(small_vocab)),
                                InvalidArgument, "DecoderPipeline", "vocab_size is 100");
    config = pipe_->text_encoder()->config();
    config.hidden_size += 8;
    DecoderComponents wide{pipe_->tokenizer(), CLIPTextModel(config),     pipe_->decoder(),
                           pipe_->vqgan(),     pipe_->scheduler_config(), 10.67};
    WUERSTCHEN_EXPECT_THROW_MSG(DecoderPipeline::from_components(std::move(wide)), InvalidArgument,
                                "DecoderPipeline", "clip_embd");
}

TEST_F(DecoderPipelineTest, LatentOutputSkipsVQGAN) {
    const auto ref = test::reference("pipeline_decoder_seed22");
    DecoderOptions opt = test::decoder_seed22_options(ref);
    opt.decode = false;
    const auto out = (*pipe_)(opt);
    EXPECT_FALSE(out.images.defined());
    const auto steps = test::ref_tensor(ref, "step_latents");
    const auto last = steps[steps.size(0) - 1];
    EXPECT_TRUE(test::all_close("decoder_seed22 final latents", out.latents, last, kPipelineTol));
}

TEST_F(DecoderPipelineTest, RejectsBadArguments) {
    const auto ref = test::reference("pipeline_decoder_seed22");
    const DecoderOptions good = test::decoder_seed22_options(ref);  // embeddings [1, 16, 6, 6] -> latents 64x64
    auto& pipe = *pipe_;

    DecoderOptions o = good;
    o.image_embeddings = torch::randn({16, 6, 6});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`image_embeddings`", "[B, 16, h, w]");
    o.image_embeddings = torch::randn({1, 8, 6, 6});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`image_embeddings`", "[1, 8, 6, 6]");
    o.image_embeddings = torch::Tensor();
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`image_embeddings`", "required");
    o.image_embeddings_list = {torch::randn({1, 16, 6, 6}), torch::randn({1, 16, 5, 6})};
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`image_embeddings_list`", "entry 1");
    // 5 * 10.67 = 53.35 -> 53, not divisible by patch_size * 2^(levels-1) = 4.
    o = good;
    o.image_embeddings = torch::randn({1, 16, 5, 6});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`image_embeddings`", "53x64",
                                "divisible by 4");

    // The guidance mix runs in the decoder's dtype: a scale beyond its range is refused.
    o = good;
    o.guidance_scale = 1e300;
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`guidance_scale`", "Float");

    o = good;
    o.image_embeddings = torch::randn({2, 16, 6, 6});
    o.prompts = {"a", "b", "c"};
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`prompts`", "3 prompts", "(2)");
    o.prompts = {};
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`prompts`", "0 prompts");
    o.prompts = {"a", "b"};
    o.guidance_scale = 2.0;
    o.negative_prompts = {"x", "y", "z"};
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`negative_prompts`", "3 prompts");

    // Text states instead of prompts.
    const int64_t hidden = pipe.text_encoder()->config().hidden_size;
    o = good;
    o.prompts = {"a"};
    o.prompt_embeds = torch::randn({1, 77, hidden});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`prompts`", "`prompt_embeds`",
                                "both set");
    o.prompts = {};
    o.prompt_embeds = torch::randn({1, 77, hidden + 1});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`prompt_embeds`",
                                "[P, L, " + std::to_string(hidden) + "]");
    o.prompt_embeds = torch::zeros({1, 77, hidden}, torch::kLong);
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`prompt_embeds`", "floating");
    o.prompt_embeds = torch::randn({3, 77, hidden});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`prompt_embeds`", "3 prompts", "(1)");
    o.prompt_embeds = torch::randn({1, 77, hidden});
    o.guidance_scale = 2.0;
    o.negative_prompts = {"x"};
    o.negative_prompt_embeds = torch::randn({1, 77, hidden});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`negative_prompts`",
                                "`negative_prompt_embeds`", "both set");
    o.negative_prompts = {};
    o.negative_prompt_embeds = torch::randn({1, 70, hidden});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`negative_prompt_embeds`",
                                "70 tokens", "77");
    o.negative_prompt_embeds = torch::Tensor();
    o.prompt_embeds = torch::randn({1, 60, hidden});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`prompt_embeds`", "60 tokens",
                                "negative prompt");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe.encode_prompt({}), InvalidArgument, "`prompts`", "empty");

    o = good;
    o.num_inference_steps = 0;
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`num_inference_steps`", "positive");
    o = good;
    o.timesteps = {0.5, 0.7, 0.0};
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`timesteps`", "descending");
    o.timesteps = {1.0};
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`timesteps`", "at least 2");
    o = good;
    o.guidance_scale = std::numeric_limits<double>::quiet_NaN();
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`guidance_scale`", "finite");
    o = good;
    o.num_images_per_prompt = 0;
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`num_images_per_prompt`");
    o = good;
    o.latents = torch::randn({1, 4, 60, 64});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`latents`", "[1, 4, 60, 64]",
                                "[1, 4, 64, 64]");
    o.num_images_per_prompt = 2;
    o.latents = torch::randn({1, 4, 64, 64});
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`latents`", "[2, 4, 64, 64]");
    o = good;
    o.seed = 1;
    at::Generator g = make_generator(1);
    o.generator = &g;
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "`seed`", "`generator`");
}

}  // namespace
}  // namespace wuerstchen
