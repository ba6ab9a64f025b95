// PriorPipeline (stage C) against diffusers' WuerstchenPriorPipeline
// (tests/data/references/pipeline_prior_*.safetensors, made by gen_fixtures.py).

#include <c10/core/InferenceMode.h>

#include <limits>
#include <string>
#include <vector>

#include "reference_cases.h"
#include "test_util.h"
#include "wuerstchen/error.h"
#include "wuerstchen/prior_pipeline.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::data_path;
using test::ref_tensor;
using test::reference;
using test::scaled_tol;

constexpr double kRel = 1e-3;

PriorPipeline& pipeline() {
    static PriorPipeline pipe = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"));
    return pipe;
}

// Collects the latents after each step, like gen_fixtures.py's callback.
struct StepRecorder {
    std::vector<torch::Tensor> steps;
    StepCallback callback() {
        return [this](int, double, torch::Tensor& latents) {
            steps.push_back(latents.clone());
            return true;
        };
    }
};

void expect_matches(const std::string& name, const torch::Tensor& embeddings,
                    const StepRecorder& rec) {
    auto ref = reference(name);
    auto expected = ref_tensor(ref, "image_embeddings");
    EXPECT_TRUE(
        all_close(name + " image_embeddings", embeddings, expected, scaled_tol(expected, kRel)));
    auto expected_steps = ref_tensor(ref, "step_latents");
    ASSERT_EQ(static_cast<int64_t>(rec.steps.size()), expected_steps.size(0));
    for (size_t i = 0; i < rec.steps.size(); ++i) {
        auto e = expected_steps[static_cast<int64_t>(i)];
        EXPECT_TRUE(all_close(name + " step_latents[" + std::to_string(i) + "]", rec.steps[i], e,
                              scaled_tol(e, kRel)));
    }
}

TEST(PriorPipeline, Seed0MatchesDiffusers) {
    StepRecorder rec;
    auto o = test::prior_seed0_options();
    o.callback = rec.callback();
    auto out = pipeline()(o);
    EXPECT_EQ(out.image_embeddings.sizes(), (std::vector<int64_t>{1, 16, 6, 6}));
    expect_matches("pipeline_prior_seed0", out.image_embeddings, rec);
}

TEST(PriorPipeline, LatentsNegativePromptTwoImagesMatchesDiffusers) {
    auto ref = reference("pipeline_prior_latents_neg_x2");
    StepRecorder rec;
    PriorOptions o;
    o.prompt("a red sports car");
    o.negative_prompts = {"blurry, low quality"};
    o.height = 320;
    o.width = 256;
    o.timesteps = kDefaultStageCTimesteps;
    o.guidance_scale = 4.0;
    o.num_images_per_prompt = 2;
    o.latents = ref_tensor(ref, "latents_in");
    o.seed = 12;
    o.callback = rec.callback();
    auto out = pipeline()(o);
    expect_matches("pipeline_prior_latents_neg_x2", out.image_embeddings, rec);
}

// With guidance, prompts and negative prompts given as text are encoded in one batch (one text
// encoder forward: its token and position embeddings once), each row as when encoded alone.
TEST(PriorPipeline, PromptsAndNegativesEncodedInOneBatch) {
    auto& pipe = pipeline();
    const std::vector<std::string> prompts = {"horse", "a cozy cabin"};
    const std::vector<std::string> negatives = {"blurry", ""};
    torch::Tensor both;
    const auto ops = test::count_ops({"aten::embedding"}, [&] {
        std::vector<std::string> texts = prompts;
        texts.insert(texts.end(), negatives.begin(), negatives.end());
        both = pipe.encode_prompt(texts);
    });
    ASSERT_EQ(ops.at("aten::embedding"), 2);  // one forward
    for (size_t i = 0; i < 4; ++i) {
        const auto alone = pipe.encode_prompt({i < 2 ? prompts[i] : negatives[i - 2]});
        EXPECT_TRUE(all_close("row " + std::to_string(i) + " batched vs alone",
                              both.narrow(0, static_cast<int64_t>(i), 1), alone,
                              scaled_tol(alone, 1e-6)));
    }
    PriorOptions o;
    o.prompts = prompts;
    o.negative_prompts = negatives;
    o.height = o.width = 128;
    o.num_inference_steps = 1;
    o.guidance_scale = 4.0;
    o.seed = 1;
    const auto call = test::count_ops({"aten::embedding"}, [&] { pipe(o); });
    EXPECT_EQ(call.at("aten::embedding"), 2) << "prompts and negative prompts in one forward";
    // The same call from the states encoded apart.
    PriorOptions from_states = o;
    from_states.prompts = {};
    from_states.negative_prompts = {};
    from_states.prompt_embeds =
        torch::cat({pipe.encode_prompt({prompts[0]}), pipe.encode_prompt({prompts[1]})});
    from_states.negative_prompt_embeds =
        torch::cat({pipe.encode_prompt({negatives[0]}), pipe.encode_prompt({negatives[1]})});
    const auto expected = pipe(from_states).image_embeddings;
    EXPECT_TRUE(all_close("prompts encoded in one batch vs apart", pipe(o).image_embeddings,
                          expected, scaled_tol(expected, 1e-5)));
}

TEST(PriorPipeline, BatchWithoutGuidanceMatchesDiffusers) {
    StepRecorder rec;
    PriorOptions o;
    o.prompts = {"horse", "a cozy cabin in the snowy mountains"};
    o.height = 128;
    o.width = 384;
    o.num_inference_steps = 3;
    o.guidance_scale = 1.0;
    o.seed = 5;
    o.callback = rec.callback();
    auto out = pipeline()(o);
    expect_matches("pipeline_prior_batch2_nocfg", out.image_embeddings, rec);
}

TEST(PriorPipeline, CallerGeneratorAndPromptEmbeds) {
    // The same call through a caller-owned generator and precomputed text states.
    auto o = test::prior_seed0_options();
    o.seed.reset();
    auto gen = make_generator(0);
    o.generator = &gen;
    o.prompts.clear();
    o.prompt_embeds = encode_prompts(pipeline().tokenizer(), pipeline().text_encoder(), {"horse"},
                                     torch::kCPU, torch::kFloat32);
    auto expected = ref_tensor(reference("pipeline_prior_seed0"), "image_embeddings");
    auto out = pipeline()(o);
    EXPECT_TRUE(all_close("prior_seed0 via generator + prompt_embeds", out.image_embeddings,
                          expected, scaled_tol(expected, kRel)));
}

TEST(PriorPipeline, CombinedFolderComponents) {
    auto pipe = PriorPipeline::from_components(data_path("tiny-wuerstchen-combined"), "prior_");
    EXPECT_DOUBLE_EQ(pipe.config().latent_mean, 42.0);
    EXPECT_DOUBLE_EQ(pipe.config().resolution_multiple, 42.67);
    auto expected = ref_tensor(reference("pipeline_prior_seed0"), "image_embeddings");
    auto out = pipe(test::prior_seed0_options());
    EXPECT_TRUE(all_close("prior_seed0 from the combined folder", out.image_embeddings, expected,
                          scaled_tol(expected, kRel)));
    WUERSTCHEN_EXPECT_THROW_MSG(
        PriorPipeline::from_components(data_path("tiny-wuerstchen-combined"), "nope_"), ConfigError,
        "model_index.json", "nope_prior");
}

TEST(PriorPipeline, CallbackCancelsAndPipelineStaysUsable) {
    auto o = test::prior_seed0_options();
    int calls = 0;
    o.callback = [&calls](int step, double, torch::Tensor&) {
        ++calls;
        return step < 1;
    };
    WUERSTCHEN_EXPECT_THROW_MSG(pipeline()(o), Cancelled, "cancelled", "step 1");
    EXPECT_EQ(calls, 2);
    auto expected = ref_tensor(reference("pipeline_prior_seed0"), "image_embeddings");
    auto out = pipeline()(test::prior_seed0_options());
    EXPECT_TRUE(all_close("prior_seed0 after a cancelled call", out.image_embeddings, expected,
                          scaled_tol(expected, kRel)));
}

// On the CPU a call projects the text rows' keys and values once (map_condition's project_kv):
// a callback that changes an attention weight in place mid-call gets InvalidArgument, not steps
// that mix old and new weights; with the weight as it was, the next call matches the reference.
TEST(PriorPipeline, WeightsChangedByACallbackAreRefused) {
    PriorPipeline pipe = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"));
    const torch::Tensor weight = test::parameters_named(*pipe.prior(), "attention.to_k.weight")[0];
    const torch::Tensor original = weight.detach().clone();
    auto o = test::prior_seed0_options();
    o.callback = [&](int, double, torch::Tensor&) {
        torch::NoGradGuard no_grad;
        weight.mul_(2.0);
        return true;
    };
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "map it again", "attention block 0");
    {
        torch::NoGradGuard no_grad;
        weight.copy_(original);
    }
    auto expected = ref_tensor(reference("pipeline_prior_seed0"), "image_embeddings");
    auto out = pipe(test::prior_seed0_options());
    EXPECT_TRUE(all_close("prior_seed0 after the refused call", out.image_embeddings, expected,
                          scaled_tol(expected, kRel)));

    // Any parameter the callback replaces (here the text condition mapper's, which the call
    // mapped once): refused after the callback.
    o.callback = [&](int, double, torch::Tensor&) {
        torch::Tensor w = test::parameters_named(*pipe.prior(), "cond_mapper.0.weight")[0];
        w.set_data(w.detach().clone());
        return true;
    };
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(o), InvalidArgument, "step callback after step 0",
                                "replaced the prior's weights");
    out = pipe(test::prior_seed0_options());
    EXPECT_TRUE(all_close("prior_seed0 after the second refused call", out.image_embeddings,
                          expected, scaled_tol(expected, kRel)));

    // A weight that the call mapped once, changed in place (the text condition mapper's, the
    // timestep mappers'): refused after the callback, naming the module, on any device (a CUDA
    // graph's replay runs no checks of the forward). A new pipeline: the weight replaced above
    // took an inference tensor's data (the callback runs in inference mode), which has no
    // version to check.
    pipe = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"));
    for (const std::string name : {"cond_mapper.2.bias", "blocks.1.mapper.bias"}) {
        SCOPED_TRACE(name);
        const torch::Tensor mapped = test::parameters_named(*pipe.prior(), name).at(0);
        o.callback = [&](int, double, torch::Tensor&) {
            torch::NoGradGuard no_grad;
            mapped.mul_(1.0);  // a new version, the same values
            return true;
        };
        WUERSTCHEN_EXPECT_THROW_MSG(
            pipe(o), InvalidArgument, "step callback after step 0",
            "changed the prior's weights in place",
            name == "cond_mapper.2.bias" ? "mapped by cond_mapper" : "WuerstchenPrior");
    }
    out = pipe(test::prior_seed0_options());
    EXPECT_TRUE(all_close("prior_seed0 after the third refused call", out.image_embeddings,
                          expected, scaled_tol(expected, kRel)));

    // Cancelling wins over the check; after the last step nothing reads the mapped values again.
    const torch::Tensor cond_bias = test::parameters_named(*pipe.prior(), "cond_mapper.2.bias")[0];
    const int last = test::prior_seed0_options().num_inference_steps - 1;
    o.callback = [&](int step, double, torch::Tensor&) {
        torch::NoGradGuard no_grad;
        torch::Tensor(cond_bias).mul_(1.0);
        return step != 0;
    };
    EXPECT_THROW(pipe(o), Cancelled);
    o.callback = [&](int step, double, torch::Tensor&) {
        if (step == last) {
            torch::NoGradGuard no_grad;
            torch::Tensor(cond_bias).mul_(1.0);
        }
        return true;
    };
    EXPECT_TRUE(all_close("prior_seed0 with an edit after the last step", pipe(o).image_embeddings,
                          expected, scaled_tol(expected, kRel)));
}

// LoadOptions::project_text_kv = false on the CPU: each step projects the text's keys and values
// itself. The same embeddings as the reference; and since no keys or values were mapped ahead, a
// step callback may edit a to_k weight in place (the later steps read it), which the default
// form refuses (above).
TEST(PriorPipeline, TextKeysAndValuesPerStepWhenAsked) {
    LoadOptions load;
    load.project_text_kv = false;
    EXPECT_FALSE(projects_text_kv(load, torch::kCPU));
    EXPECT_TRUE(projects_text_kv(LoadOptions{}, torch::kCPU));
    PriorPipeline pipe = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"), load);
    auto expected = ref_tensor(reference("pipeline_prior_seed0"), "image_embeddings");
    EXPECT_TRUE(all_close("prior_seed0, keys and values per step",
                          pipe(test::prior_seed0_options()).image_embeddings, expected,
                          scaled_tol(expected, kRel)));
    const torch::Tensor weight = test::parameters_named(*pipe.prior(), "attention.to_k.weight")[0];
    auto o = test::prior_seed0_options();
    int edits = 0;
    o.callback = [&](int, double, torch::Tensor&) {
        torch::NoGradGuard no_grad;
        torch::Tensor(weight).mul_(1.0);
        ++edits;
        return true;
    };
    EXPECT_TRUE(all_close("prior_seed0, keys and values per step, to_k edited in place",
                          pipe(o).image_embeddings, expected, scaled_tol(expected, kRel)));
    EXPECT_EQ(edits, o.num_inference_steps);
}

// Given latents are read in any memory layout: the same values as contiguous ones (a
// channels-last input chose other convolution kernels, 2e-6 relative off), a contiguous output,
// and the caller's tensor unchanged.
TEST(PriorPipeline, GivenLatentsInAnyLayout) {
    auto o = test::prior_seed0_options();
    o.num_inference_steps = 2;
    const auto latents = torch::randn({1, 16, 6, 6});
    o.latents = latents;
    const auto expected = pipeline()(o).image_embeddings;
    const auto nhwc = latents.contiguous(at::MemoryFormat::ChannelsLast);
    const auto before = nhwc.clone();
    o.latents = nhwc;
    const auto out = pipeline()(o).image_embeddings;
    EXPECT_TRUE(torch::equal(out, expected));
    EXPECT_TRUE(out.is_contiguous());
    EXPECT_TRUE(torch::equal(nhwc, before));
}

TEST(PriorPipeline, CallbackMayReplaceLatents) {
    auto o = test::prior_seed0_options();
    o.num_inference_steps = 2;
    o.callback = [](int, double, torch::Tensor& latents) {
        latents = torch::zeros_like(latents);
        return true;
    };
    auto out = pipeline()(o);
    // After the last step the latents are zero: embeddings = 0 * mean - std.
    EXPECT_TRUE(torch::equal(out.image_embeddings, torch::full({1, 16, 6, 6}, -1.0f)));
    o.callback = [](int, double, torch::Tensor& latents) {
        latents = torch::zeros({1, 2, 3});
        return true;
    };
    WUERSTCHEN_EXPECT_THROW_MSG(pipeline()(o), InvalidArgument, "latents", "[1, 2, 3]");
}

TEST(PriorPipeline, RejectsBadArguments) {
    auto& pipe = pipeline();
    auto bad = [](auto edit) {
        auto o = test::prior_seed0_options();
        edit(o);
        return o;
    };
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) { o.height = 0; })), InvalidArgument,
                                "`height`", "positive");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) { o.width = -8; })), InvalidArgument,
                                "`width`", "positive");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) { o.num_inference_steps = 0; })),
                                InvalidArgument, "`num_inference_steps`");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) { o.num_images_per_prompt = 0; })),
                                InvalidArgument, "`num_images_per_prompt`");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.timesteps = {1.0, 0.5, 0.7};
                                })),
                                InvalidArgument, "`timesteps`", "descending");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.timesteps = {1.2, 0.0};
                                })),
                                InvalidArgument, "`timesteps`", "[0, 1]");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) { o.timesteps = {1.0}; })),
                                InvalidArgument, "`timesteps`", "at least 2");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) { o.guidance_scale = std::nan(""); })),
                                InvalidArgument, "`guidance_scale`", "finite");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) { o.prompts.clear(); })),
                                InvalidArgument, "`prompts`", "`prompt_embeds`");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.prompt_embeds = torch::zeros({1, 77, 32});
                                })),
                                InvalidArgument, "`prompts`", "`prompt_embeds`", "both");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.prompts.clear();
                                    o.prompt_embeds = torch::zeros({1, 77, 31});
                                })),
                                InvalidArgument, "`prompt_embeds`", "[1, 77, 31]");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.prompts = {"a", "b"};
                                    o.negative_prompts = {"c"};
                                })),
                                InvalidArgument, "`negative_prompts`", "1", "2");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.negative_prompts = {"c"};
                                    o.negative_prompt_embeds = torch::zeros({1, 77, 32});
                                })),
                                InvalidArgument, "`negative_prompts`", "`negative_prompt_embeds`");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.prompts.clear();
                                    o.prompt_embeds = torch::zeros({1, 77, 32});
                                    o.negative_prompt_embeds = torch::zeros({1, 70, 32});
                                })),
                                InvalidArgument, "`negative_prompt_embeds`", "[1, 70, 32]");
    // With guidance both halves go through one forward: their token counts must agree.
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.negative_prompt_embeds = torch::zeros({1, 70, 32});
                                })),
                                InvalidArgument, "`negative_prompt_embeds`", "70", "77");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.prompts.clear();
                                    o.prompt_embeds = torch::zeros({1, 60, 32});
                                })),
                                InvalidArgument, "`prompt_embeds`", "60", "77");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.prompts.clear();
                                    o.prompt_embeds = torch::zeros({1, 0, 32});
                                })),
                                InvalidArgument, "`prompt_embeds`", "[1, 0, 32]");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.prompts.clear();
                                    o.prompt_embeds = torch::zeros({1, 77, 32}, torch::kLong);
                                })),
                                InvalidArgument, "`prompt_embeds`", "floating", "Long");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.negative_prompt_embeds = torch::zeros({1, 0, 32});
                                })),
                                InvalidArgument, "`negative_prompt_embeds`", "[1, 0, 32]");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.latents = torch::zeros({1, 16, 6, 5});
                                })),
                                InvalidArgument, "`latents`", "[1, 16, 6, 5]", "[1, 16, 6, 6]");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) { o.guidance_scale = 1e300; })),
                                InvalidArgument, "`guidance_scale`", "Float");
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([](PriorOptions& o) {
                                    o.height = o.width = std::numeric_limits<int>::max();
                                    o.num_images_per_prompt = 1000;
                                })),
                                InvalidArgument, "`height`", "too large");
    WUERSTCHEN_EXPECT_THROW_MSG(
        pipe(bad([](PriorOptions& o) { o.num_inference_steps = std::numeric_limits<int>::max(); })),
        InvalidArgument, "`num_inference_steps`", "at most");
    auto gen = make_generator(1);
    WUERSTCHEN_EXPECT_THROW_MSG(pipe(bad([&gen](PriorOptions& o) { o.generator = &gen; })),
                                InvalidArgument, "`seed`", "`generator`");
}

}  // namespace
}  // namespace wuerstchen
