// DDPMWuerstchenScheduler against diffusers (tests/data/references/scheduler.safetensors), and
// its step plan (every step's timestep factors at once) against the per-step form.

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "step_noise.h"
#include "test_util.h"
#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/scheduler.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::data_path;
using test::ref_tensor;
using test::reference;

constexpr double kTol = 1e-6;

TEST(Scheduler, TimestepsMatchLinspace) {
    auto ref = reference("scheduler");
    DDPMWuerstchenScheduler sched;
    sched.set_timesteps(12);
    EXPECT_EQ(sched.num_steps(), 12);
    EXPECT_TRUE(
        all_close("timesteps_12", sched.timesteps(), ref_tensor(ref, "timesteps_12"), kTol));
}

TEST(Scheduler, DefaultStageCTimesteps) {
    std::ifstream in(data_path("references/index.json"));
    const auto index = nlohmann::json::parse(in);
    const auto expected = index.at("default_stage_c_timesteps").get<std::vector<double>>();
    ASSERT_EQ(kDefaultStageCTimesteps.size(), expected.size());
    for (size_t i = 0; i < expected.size(); ++i)
        EXPECT_NEAR(kDefaultStageCTimesteps[i], expected[i], 1e-15) << "index " << i;

    DDPMWuerstchenScheduler sched;
    sched.set_timesteps(kDefaultStageCTimesteps);
    EXPECT_EQ(sched.num_steps(), 29);
    EXPECT_TRUE(all_close("timesteps_stage_c", sched.timesteps(),
                          ref_tensor(reference("scheduler"), "timesteps_stage_c"), kTol));
}

TEST(Scheduler, AlphaCumprod) {
    auto ref = reference("scheduler");
    DDPMWuerstchenScheduler sched;
    EXPECT_TRUE(all_close("alpha_cumprod_12", sched.alpha_cumprod(ref_tensor(ref, "timesteps_12")),
                          ref_tensor(ref, "alpha_cumprod_12"), kTol));
}

TEST(Scheduler, GeneratorDrawMatchesTorch) {
    auto ref = reference("scheduler");
    auto expected = ref_tensor(ref, "randn_seed7");
    auto gen = make_generator(7);
    EXPECT_TRUE(
        all_close("randn_seed7", randn_like_diffusers(expected.sizes(), gen), expected, kTol));
}

TEST(Scheduler, StepMatchesDiffusers) {
    auto ref = reference("scheduler");
    auto sample = ref_tensor(ref, "sample");
    auto model_output = ref_tensor(ref, "model_output");
    DDPMWuerstchenScheduler sched;
    sched.set_timesteps(kDefaultStageCTimesteps);
    c10::InferenceMode guard;
    EXPECT_NEAR(sched.previous_timestep(0.6), 0.5333333, 1e-6);
    auto gen = make_generator(7);
    auto out = sched.step(model_output, torch::tensor({0.6f, 0.6f}), sample, gen);
    EXPECT_TRUE(all_close("step_t0.6_seed7", out, ref_tensor(ref, "step_t0.6_seed7"), kTol));
    // The host-timestep overload gives the same result.
    auto gen2 = make_generator(7);
    auto out2 = sched.step(model_output, 0.6, sample, gen2);
    EXPECT_TRUE(all_close("step_t0.6_seed7 (host t)", out2, out, 0.0));
    // So does the overload taking the noise (drawn ahead), which checks its shape and dtype.
    auto gen3 = make_generator(7);
    const auto noise = randn_like_diffusers(sample.sizes(), gen3);
    EXPECT_TRUE(all_close("step_t0.6_seed7 (given noise)",
                          sched.step(model_output, 0.6, sample, noise), out, 0.0));
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(model_output, 0.6, sample, noise.narrow(0, 0, 1)),
                                InvalidArgument, "`noise`", "shape");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(model_output, 0.6, sample, noise.to(torch::kDouble)),
                                InvalidArgument, "`noise`", "dtype");
}

// StepNoise: the draws made ahead on a worker thread are torch.randn's (randn_like_diffusers),
// in order, and leave the generator in the same state; draws made but not taken are undone.
TEST(StepNoise, AheadEqualsInline) {
    const std::vector<int64_t> shape = {2, 4, 8, 8};
    for (const auto dtype : {torch::kFloat32, torch::kHalf, torch::kBFloat16}) {
        auto reference_gen = make_generator(5);
        auto inline_gen = make_generator(5);
        auto ahead_gen = make_generator(5);
        {
            const std::vector<StepNoise::Draw> plan(6, {shape, dtype, torch::kCPU});
            StepNoise inline_noise(inline_gen, plan, /*ahead=*/false);
            StepNoise ahead_noise(ahead_gen, plan, /*ahead=*/true);
            for (int i = 0; i < 6; ++i) {
                const auto expected = randn_like_diffusers(shape, reference_gen, dtype);
                const auto a = ahead_noise.next(at::IntArrayRef(shape));
                EXPECT_EQ(a.scalar_type(), dtype);
                EXPECT_TRUE(torch::equal(a, expected)) << c10::toString(dtype) << " draw " << i;
                EXPECT_TRUE(torch::equal(inline_noise.next(), expected))
                    << c10::toString(dtype) << " draw " << i;
            }
            EXPECT_THROW(ahead_noise.next(), std::out_of_range);
            EXPECT_THROW(inline_noise.next(), std::out_of_range);
        }
        const auto after = randn_like_diffusers({16}, reference_gen);
        EXPECT_TRUE(torch::equal(randn_like_diffusers({16}, inline_gen), after));
        EXPECT_TRUE(torch::equal(randn_like_diffusers({16}, ahead_gen), after));
    }

    // Stopped after one of many draws: the worker is joined and the draws it made ahead are
    // undone, so the generator stands after the one draw taken, as inline.
    auto gen = make_generator(9);
    {
        std::vector<StepNoise::Draw> plan(1000, {shape, torch::kFloat32, torch::kCPU});
        StepNoise noise(gen, std::move(plan), /*ahead=*/true);
        noise.next();
        EXPECT_EQ(noise.remaining(), 999);
        std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it draw ahead
    }
    auto one_draw = make_generator(9);
    randn_like_diffusers(shape, one_draw);
    EXPECT_TRUE(torch::equal(randn_like_diffusers({16}, gen), randn_like_diffusers({16}, one_draw)))
        << "draws made ahead and not taken were not undone";

    // A plan out of step with its use is a logic error, not a silent wrong draw.
    StepNoise planned(make_generator(1),
                      std::vector<StepNoise::Draw>(2, {shape, torch::kFloat32, torch::kCPU}),
                      /*ahead=*/true);
    EXPECT_THROW(planned.next(at::IntArrayRef{2, 4, 8, 9}), std::logic_error);

    // A draw that fails on the worker reaches the caller, again on the next request, and the
    // StepNoise still goes away.
    std::vector<StepNoise::Draw> bad = {{shape, torch::kFloat32, torch::kCPU},
                                        {shape, torch::kLong, torch::kCPU}};
    StepNoise failing(make_generator(2), std::move(bad), /*ahead=*/true);
    EXPECT_NO_THROW(failing.next());
    EXPECT_THROW(failing.next(), c10::Error);
    EXPECT_THROW(failing.next(), c10::Error);
}

TEST(Scheduler, LastStepAddsNoNoise) {
    auto ref = reference("scheduler");
    auto sample = ref_tensor(ref, "sample");
    auto model_output = ref_tensor(ref, "model_output");
    DDPMWuerstchenScheduler sched;
    sched.set_timesteps(12);
    const float t = sched.timestep_values()[11];
    c10::InferenceMode guard;
    auto gen = make_generator(1);
    auto out = sched.step(model_output, torch::full({2}, t), sample, gen);
    EXPECT_TRUE(all_close("step_last_no_noise", out, ref_tensor(ref, "step_last_no_noise"), kTol));
    // The noise was still drawn: the generator advanced by one draw of the sample's shape.
    auto fresh = make_generator(1);
    randn_like_diffusers(sample.sizes(), fresh);
    EXPECT_TRUE(torch::equal(randn_like_diffusers({4}, gen), randn_like_diffusers({4}, fresh)));
}

TEST(Scheduler, AddNoise) {
    DDPMWuerstchenScheduler sched;
    auto x0 = torch::ones({2, 1, 1, 1});
    auto noise = torch::zeros({2, 1, 1, 1});
    auto t = torch::tensor({0.0f, 1.0f});
    auto a = sched.alpha_cumprod(t);
    auto out = sched.add_noise(x0, noise, t);
    EXPECT_TRUE(all_close("add_noise", out.flatten(), a.sqrt(), 1e-7));
}

// Every step of a plan against the per-step form with the same noise: schedules of 12 steps and
// the stage-C default, scaler 1 and 2, float32 and bfloat16 models.
TEST(SchedulerStepPlan, MatchesPerStep) {
    struct Case {
        std::string what;
        SchedulerConfig config;
        bool stage_c;
        torch::ScalarType dtype;
    };
    SchedulerConfig scaled;
    scaled.scaler = 2.0;
    const std::vector<Case> cases = {
        {"12 steps, float32", {}, false, torch::kFloat32},
        {"stage C default, float32", {}, true, torch::kFloat32},
        {"12 steps, scaler 2, float32", scaled, false, torch::kFloat32},
        {"stage C default, bfloat16", {}, true, torch::kBFloat16},
    };
    torch::manual_seed(3);
    c10::InferenceMode guard;
    double worst = 0.0;
    for (const auto& c : cases) {
        DDPMWuerstchenScheduler sched(c.config);
        if (c.stage_c)
            sched.set_timesteps(kDefaultStageCTimesteps);
        else
            sched.set_timesteps(12);
        const auto plan = sched.plan_steps(c.dtype, torch::kCPU);
        ASSERT_EQ(plan.steps(), sched.num_steps()) << c.what;
        const auto sample = torch::randn({3, 4, 5, 6}).to(c.dtype);
        const auto model_output = torch::randn({3, 4, 5, 6}).to(c.dtype);
        for (int i = 0; i < plan.steps(); ++i) {
            const std::string what = c.what + ", step " + std::to_string(i);
            const float t = sched.timestep_values()[static_cast<size_t>(i)];
            // The pipelines' ratio: t.expand(B).to(dtype).
            EXPECT_TRUE(torch::equal(plan.timestep(i, 3), torch::full({3}, t).to(c.dtype))) << what;
            const auto noise = torch::randn({3, 4, 5, 6}).to(c.dtype);
            const auto expected = sched.step(model_output, t, sample, noise);
            const auto out = sched.step(model_output, plan, i, sample, noise);
            ASSERT_EQ(out.scalar_type(), c.dtype) << what;
            ASSERT_EQ(out.sizes(), sample.sizes()) << what;
            // The same float32 ops per element; only the CPU's vectorised cosine may differ from
            // its scalar one in the last bit, which can move a bfloat16 result by one step.
            const double tol = c.dtype == torch::kFloat32 ? 1e-5 : 2e-2;
            const auto err = (out.to(torch::kFloat64) - expected.to(torch::kFloat64)).abs();
            const double rel =
                (err / (expected.to(torch::kFloat64).abs() + 1.0)).max().item<double>();
            worst = std::max(worst, c.dtype == torch::kFloat32 ? rel : 0.0);
            EXPECT_LE(rel, tol) << what;
        }
    }
    std::cout << "[ parity   ] step plan vs per-step (float32): max relative error " << worst
              << " (tolerance 1e-05)\n";
}

TEST(SchedulerStepPlan, StepRunsNoScheduleMath) {
    // The per-step form evaluates the cosine schedule twice per call (about fifty small ops in
    // all); a planned step only combines the tensors.
    const std::vector<std::string> schedule_ops = {"aten::cos", "aten::pow", "aten::clamp",
                                                   "aten::sqrt", "aten::reciprocal",
                                                   "aten::full"};
    DDPMWuerstchenScheduler sched;
    sched.set_timesteps(12);
    const auto plan = sched.plan_steps(torch::kFloat32, torch::kCPU);
    const auto x = torch::randn({2, 4, 3, 3});
    c10::InferenceMode guard;
    const float t = sched.timestep_values()[5];
    const auto per_step = test::count_ops(schedule_ops, [&] { sched.step(x, t, x, x); });
    const auto planned = test::count_ops(schedule_ops, [&] { sched.step(x, plan, 5, x, x); });
    for (const auto& op : schedule_ops) {
        EXPECT_EQ(planned.at(op), 0) << op;
        EXPECT_GT(per_step.at(op), 0) << op;
    }
}

TEST(SchedulerStepPlan, RejectsAnotherScheduleStepOrDtype) {
    DDPMWuerstchenScheduler sched;
    WUERSTCHEN_EXPECT_THROW_MSG(sched.plan_steps(torch::kFloat32, torch::kCPU), InvalidArgument,
                                "set_timesteps");
    sched.set_timesteps(4);
    const auto plan = sched.plan_steps(torch::kFloat32, torch::kCPU);
    const auto x = torch::zeros({1, 2, 2, 2});
    c10::InferenceMode guard;
    EXPECT_EQ(sched.step(x, plan, 3, x, x).sizes(), x.sizes());
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(x, plan, 4, x, x), InvalidArgument, "step 4", "4 steps");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(x, plan, -1, x, x), InvalidArgument, "step -1");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(x.to(torch::kDouble), plan, 0, x, x), InvalidArgument,
                                "`model_output`", "Float");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(x, plan, 0, x, x.narrow(0, 0, 0)), InvalidArgument,
                                "`noise`", "shape");
    sched.set_timesteps(5);
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(x, plan, 0, x, x), InvalidArgument, "another schedule");
}

TEST(Scheduler, RejectsBadTimesteps) {
    DDPMWuerstchenScheduler sched;
    WUERSTCHEN_EXPECT_THROW_MSG(sched.set_timesteps(0), InvalidArgument, "num_inference_steps",
                                "positive");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.set_timesteps(std::vector<double>{1.0}), InvalidArgument,
                                "timesteps", "at least 2");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.set_timesteps(std::vector<double>{0.5, 0.7, 0.0}),
                                InvalidArgument, "timesteps", "descending");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.set_timesteps(std::vector<double>{1.5, 0.0}), InvalidArgument,
                                "timesteps", "[0, 1]");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.set_timesteps(std::numeric_limits<int>::max()),
                                InvalidArgument, "num_inference_steps", "at most");
    sched.set_timesteps(4);
    auto gen = make_generator(0);
    auto x = torch::zeros({1, 1, 1, 1});
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(x, 0.0, x, gen), InvalidArgument, "last point");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.step(x, std::nan(""), x, gen), InvalidArgument, "finite");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.previous_timestep(std::nan("")), InvalidArgument, "finite");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.previous_timestep(torch::tensor(0.5)), InvalidArgument,
                                "`timestep`", "[B]");
}

// The model output must have the sample's shape: no broadcast, no batch taken from it.
TEST(Scheduler, RejectsAModelOutputOfAnotherShape) {
    DDPMWuerstchenScheduler sched;
    sched.set_timesteps(4);
    auto gen = make_generator(0);
    const auto sample = torch::zeros({1, 4, 8, 8});
    for (const auto& output : {torch::zeros({1, 4, 8, 1}), torch::zeros({2, 4, 8, 8}),
                               torch::zeros({1, 4, 8, 9}), torch::Tensor()}) {
        WUERSTCHEN_EXPECT_THROW_MSG(sched.step(output, 1.0, sample, gen), InvalidArgument,
                                    "`model_output`", "[1, 4, 8, 8]");
        WUERSTCHEN_EXPECT_THROW_MSG(sched.step(output, 1.0, sample, torch::zeros_like(sample)),
                                    InvalidArgument, "`model_output`", "[1, 4, 8, 8]");
        WUERSTCHEN_EXPECT_THROW_MSG(sched.step(output, torch::ones({1}), sample, gen),
                                    InvalidArgument, "`model_output`", "[1, 4, 8, 8]");
    }
    const auto plan = sched.plan_steps(torch::kFloat32, torch::kCPU);
    WUERSTCHEN_EXPECT_THROW_MSG(
        sched.step(torch::zeros({1, 4, 8, 1}), plan, 0, sample, torch::zeros_like(sample)),
        InvalidArgument, "`model_output`", "[1, 4, 8, 8]");
}

TEST(Scheduler, AddNoiseRejectsMismatchedInputs) {
    DDPMWuerstchenScheduler sched;
    const auto x = torch::zeros({2, 4, 3, 3});
    const auto t = torch::full({2}, 0.5);
    EXPECT_NO_THROW(sched.add_noise(x, x, torch::full({1}, 0.5)));  // one t for the batch
    EXPECT_NO_THROW(sched.add_noise(x, torch::zeros({1, 4, 1, 3}), t));  // noise broadcasts
    WUERSTCHEN_EXPECT_THROW_MSG(sched.add_noise(x, x, torch::full({3}, 0.5)), InvalidArgument,
                                "`timesteps`", "[2] or [1]");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.add_noise(x, x, torch::tensor(0.5)), InvalidArgument,
                                "`timesteps`");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.add_noise(x, x, torch::Tensor()), InvalidArgument,
                                "`timesteps`", "undefined");
    for (const auto& noise : {torch::zeros({2, 4, 3, 2}), torch::zeros({3, 4, 3, 3})})
        WUERSTCHEN_EXPECT_THROW_MSG(sched.add_noise(x, noise, t), InvalidArgument, "`noise`",
                                    "[2, 4, 3, 3]");
    WUERSTCHEN_EXPECT_THROW_MSG(sched.add_noise(torch::Tensor(), x, t), InvalidArgument,
                                "`original_samples`");
}

}  // namespace
}  // namespace wuerstchen
