// The models' map_timesteps and forward(x, MappedTimesteps, condition): the timestep blocks'
// modulations for all of a call's ratios in one product, a step reading its row. The same forward
// as mapping r at the step, no r-embedding or mapper product in the step, typed errors for rows
// that do not fit, and pipelines that map once per call.

#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <string>

#include "reference_cases.h"
#include "test_util.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/mapped_timesteps.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/prior_pipeline.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::count_ops;
using test::ref_tensor;
using test::scaled_tol;

// Ratios around those of a reference input r ([2]): r[0] at index 1 and r[1] at index 3, among
// others, as a pipeline maps a whole schedule.
torch::Tensor schedule_around(const torch::Tensor& r) {
    return torch::stack(
        {torch::ones({}, r.options()), r[0], r[0] * 0.5, r[1], torch::zeros({}, r.options())});
}

// The rows of map_timesteps(schedule_around(r)) for r[0] and r[1]: rows for the reference's
// batch of 2, mapped with other ratios in one product.
template <class Model>
MappedTimesteps rows_for_reference(Model& model, const torch::Tensor& r) {
    const MappedTimesteps all = model->map_timesteps(schedule_around(r));
    EXPECT_TRUE(all.defined());
    if (!all.defined()) return all;
    EXPECT_EQ(all.rows.size(0), 5);
    return all.with_rows(torch::cat({all.rows[1].unsqueeze(0), all.rows[3].unsqueeze(0)}));
}

struct PriorCase {
    PriorCase() : ref(test::reference("prior_forward")), model(load_prior(dir())) {}
    static std::string dir() { return test::data_path("tiny-wuerstchen-prior/prior"); }
    torch::Tensor x() const { return ref_tensor(ref, "x"); }
    torch::Tensor r() const { return ref_tensor(ref, "r"); }
    PriorCondition condition() { return model->map_condition(ref_tensor(ref, "c")); }
    SafeTensors ref;
    WuerstchenPrior model;
};

struct DecoderCase {
    DecoderCase()
        : ref(test::reference("decoder_forward")),
          model(load_diffnext(test::data_path("tiny-wuerstchen/decoder"))) {}
    torch::Tensor x() const { return ref_tensor(ref, "x"); }
    torch::Tensor r() const { return ref_tensor(ref, "r"); }
    DiffNeXtCondition condition() {
        return model->map_condition(ref_tensor(ref, "effnet"), ref_tensor(ref, "clip"), x().size(2),
                                    x().size(3));
    }
    SafeTensors ref;
    WuerstchenDiffNeXt model;
};

// The model's forward with rows of a mapped schedule equals its forward with r, and matches
// diffusers within `diffusers_tol`; one row (`row`) serves a batch at one ratio.
template <class Case>
void expect_rows_give_the_same_forward(Case& k, const std::string& what, double diffusers_tol,
                                       int64_t row) {
    c10::InferenceMode guard;
    const auto condition = k.condition();
    const auto expected = k.model->forward(k.x(), k.r(), condition);
    const MappedTimesteps rows = rows_for_reference(k.model, k.r());
    ASSERT_TRUE(rows.residual_biases_folded) << what;
    // Rows mapped with the schedule in one product: the same sums, rounded alike up to float32.
    EXPECT_TRUE(all_close(what + ", rows of a mapped schedule vs r",
                          k.model->forward(k.x(), rows, condition), expected,
                          scaled_tol(expected, 1e-6)));
    EXPECT_TRUE(all_close(what + ", rows vs diffusers", k.model->forward(k.x(), rows, condition),
                          ref_tensor(k.ref, "out"), diffusers_tol));
    const auto same_r = k.r()[row].expand({2});
    const auto one_ratio = k.model->forward(k.x(), same_r, condition);
    EXPECT_TRUE(
        all_close(what + ", one row for the batch vs r expanded",
                  k.model->forward(k.x(), k.model->map_timesteps(k.r()).row(row), condition),
                  one_ratio, scaled_tol(one_ratio, 1e-6)));
}

TEST(MappedTimesteps, PriorRowsGiveTheSameForward) {
    PriorCase p;
    expect_rows_give_the_same_forward(p, "prior", 1.5e-3, 1);
}

TEST(MappedTimesteps, DecoderRowsGiveTheSameForward) {
    DecoderCase d;
    expect_rows_give_the_same_forward(d, "decoder", 1e-3, 0);
}

// With the rows given, a step runs no r-embedding (sin, cos) and one matrix product fewer (the
// packed timestep mappers'); the scales' +1 and the bias fold were done with the rows too.
TEST(MappedTimesteps, StepWithRowsSkipsTheEmbeddingAndTheMapperProduct) {
    PriorCase p;
    DecoderCase d;
    c10::InferenceMode guard;
    const std::vector<std::string> ops = {"aten::sin", "aten::cos", "aten::addmm", "aten::mm"};
    const auto prior_condition = p.condition();
    const auto prior_rows = p.model->map_timesteps(p.r());
    const auto decoder_condition = d.condition();
    const auto decoder_rows = d.model->map_timesteps(d.r());
    const std::vector<std::pair<std::string, std::function<void()>>> pairs = {
        {"prior, r", [&] { p.model->forward(p.x(), p.r(), prior_condition); }},
        {"prior, rows", [&] { p.model->forward(p.x(), prior_rows, prior_condition); }},
        {"decoder, r", [&] { d.model->forward(d.x(), d.r(), decoder_condition); }},
        {"decoder, rows", [&] { d.model->forward(d.x(), decoder_rows, decoder_condition); }}};
    for (size_t i = 0; i < pairs.size(); i += 2) {
        const auto with_r = count_ops(ops, pairs[i].second);
        const auto with_rows = count_ops(ops, pairs[i + 1].second);
        const std::string& what = pairs[i + 1].first;
        EXPECT_EQ(with_r.at("aten::sin"), 1) << pairs[i].first;
        EXPECT_EQ(with_rows.at("aten::sin"), 0) << what;
        EXPECT_EQ(with_rows.at("aten::cos"), 0) << what;
        EXPECT_EQ(with_r.at("aten::addmm") + with_r.at("aten::mm") -
                      (with_rows.at("aten::addmm") + with_rows.at("aten::mm")),
                  1)
            << what;
    }
}

TEST(MappedTimesteps, RejectsRowsThatDoNotFit) {
    PriorCase p;
    DecoderCase d;
    c10::InferenceMode guard;
    const auto condition = p.condition();
    const MappedTimesteps rows = p.model->map_timesteps(p.r());
    ASSERT_TRUE(rows.defined());
    auto with = [&](const torch::Tensor& t) { return MappedTimesteps{t, true}; };
    // Three rows for a batch of two; one column short; another dtype; the decoder's rows.
    const auto three = torch::cat({rows.rows, rows.rows.narrow(0, 0, 1)});
    WUERSTCHEN_EXPECT_THROW_MSG(p.model->forward(p.x(), with(three), condition), InvalidArgument,
                                "WuerstchenPrior", "map_timesteps", "[3,");
    WUERSTCHEN_EXPECT_THROW_MSG(
        p.model->forward(p.x(), with(rows.rows.narrow(1, 0, rows.rows.size(1) - 1)), condition),
        InvalidArgument, "WuerstchenPrior", "map_timesteps");
    WUERSTCHEN_EXPECT_THROW_MSG(
        p.model->forward(p.x(), with(rows.rows.to(torch::kFloat64)), condition), InvalidArgument,
        "WuerstchenPrior", "Double");
    WUERSTCHEN_EXPECT_THROW_MSG(p.model->forward(p.x(), d.model->map_timesteps(d.r()), condition),
                                InvalidArgument, "WuerstchenPrior", "map_timesteps");
    WUERSTCHEN_EXPECT_THROW_MSG(d.model->forward(d.x(), rows, d.condition()), InvalidArgument,
                                "WuerstchenDiffNeXt", "map_timesteps");
    WUERSTCHEN_EXPECT_THROW_MSG(p.model->forward(p.x(), MappedTimesteps{}, condition),
                                InvalidArgument, "WuerstchenPrior", "undefined");
    WUERSTCHEN_EXPECT_THROW_MSG(rows.row(2), InvalidArgument, "MappedTimesteps::row", "no row 2");
    WUERSTCHEN_EXPECT_THROW_MSG(rows.row(-1), InvalidArgument, "no row -1");
    WUERSTCHEN_EXPECT_THROW_MSG(p.model->map_timesteps(p.r().unsqueeze(0)), InvalidArgument,
                                "WuerstchenPrior::map_timesteps", "[N]");
    WUERSTCHEN_EXPECT_THROW_MSG(d.model->map_timesteps(torch::Tensor()), InvalidArgument,
                                "WuerstchenDiffNeXt::map_timesteps", "undefined");
}

// Rows hold while the weights they were mapped from do: a forward refuses rows that went stale
// (else it would read the old modulations, or skip a residual block's new LoRA branch), and
// rows that map_timesteps did not make.
TEST(MappedTimesteps, RefusesRowsOfChangedWeights) {
    PriorCase p;
    const auto x = p.x();
    const auto r = p.r();
    auto& prior = p.model;
    PriorCondition condition;
    MappedTimesteps rows;
    auto remap = [&] {
        torch::NoGradGuard no_grad;
        condition = prior->map_condition(ref_tensor(p.ref, "c"));
        rows = prior->map_timesteps(r);
        ASSERT_TRUE(rows.defined());
    };
    auto forward = [&] {
        torch::NoGradGuard no_grad;
        return prior->forward(x, rows, condition);
    };
    auto expect_refused = [&](const std::string& what) {
        SCOPED_TRACE(what);
        WUERSTCHEN_EXPECT_THROW_MSG(forward(), InvalidArgument, "WuerstchenPrior",
                                    "map them again");
    };
    auto module = [&](const std::string& name) {
        return prior->named_modules()[name]->as<LoraLinearImpl>();
    };
    remap();
    const auto before = forward();

    // A mapper's weight changed in place; a residual block's last bias replaced.
    {
        torch::NoGradGuard no_grad;
        module("blocks.1.mapper")->weight.mul_(0.5);
    }
    expect_refused("mapper changed in place");
    remap();
    EXPECT_GT(test::max_abs_diff(forward(), before), 1e-3);

    // A LoRA adapter added to a residual block's fc2 (its branch must run: no fold), then
    // deleted (the rows hold again).
    ASSERT_TRUE(rows.residual_biases_folded);
    auto* fc2 = module("blocks.0.channelwise.4");
    const int64_t in = fc2->weight.size(1), out = fc2->weight.size(0);
    fc2->add_adapter("a", torch::randn({2, in}), torch::randn({out, 2}), 2.0);
    expect_refused("LoRA adapter on an fc2");
    fc2->delete_adapter("a");
    EXPECT_NO_THROW(forward());

    // Rows that map_timesteps did not make, or with the other form of the bias fold.
    const auto made = rows;
    rows = MappedTimesteps{made.rows, made.residual_biases_folded};
    expect_refused("rows without a source");
    rows = made;
    rows.residual_biases_folded = !made.residual_biases_folded;
    expect_refused("bias fold flipped");
    rows = made;
    EXPECT_NO_THROW(forward());
    // Autograd on: the fold and the packed product are for inference only.
    {
        torch::AutoGradMode grad(true);
        WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(x, rows, condition), InvalidArgument,
                                    "map them again");
    }
    // A residual block's last bias replaced (which also ends the fold until packed again).
    {
        torch::NoGradGuard no_grad;
        auto& bias = fc2->bias;
        bias.set_data(bias.detach().clone());
    }
    expect_refused("residual bias replaced");
    remap();
    EXPECT_FALSE(rows.residual_biases_folded);
    torch::Tensor expected;
    {
        torch::NoGradGuard no_grad;
        expected = prior->forward(x, r, condition);
    }
    EXPECT_TRUE(all_close("prior, rows without the fold vs r", forward(), expected,
                          scaled_tol(expected, 1e-6)));
}

// Weights made in c10::InferenceMode have no version to check rows against: map_timesteps maps
// nothing ahead for them and each step maps its ratio.
TEST(MappedTimesteps, InferenceTensorWeightsMapPerStep) {
    c10::InferenceMode guard;
    auto prior = load_prior(PriorCase::dir());
    EXPECT_FALSE(prior->map_timesteps(torch::tensor({0.5f, 0.25f})).defined());
}

// Unpacked (offloaded) models map nothing ahead: forward needs r, and says so.
TEST(MappedTimesteps, UnpackedModelsMapPerStep) {
    auto prior = load_prior(PriorCase::dir(), test::unpacked_load());
    auto decoder = load_diffnext(test::data_path("tiny-wuerstchen/decoder"), test::unpacked_load());
    c10::InferenceMode guard;
    const auto r = torch::tensor({0.5f, 0.25f});
    EXPECT_FALSE(prior->map_timesteps(r).defined());
    EXPECT_FALSE(decoder->map_timesteps(r).defined());
    PriorCase p;
    const auto condition = prior->map_condition(ref_tensor(p.ref, "c"));
    WUERSTCHEN_EXPECT_THROW_MSG(prior->forward(p.x(), prior->map_timesteps(p.r()), condition),
                                InvalidArgument, "undefined", "pass r");
}

// The pipelines map every step's ratio in one go: one r-embedding (one sin) per call, whatever
// the number of steps.
TEST(MappedTimesteps, PipelinesMapOncePerCall) {
    auto prior = PriorPipeline::from_pretrained(test::data_path("tiny-wuerstchen-prior"));
    PriorOptions po = test::prior_seed0_options();
    po.num_inference_steps = 3;
    const auto prior_ops = count_ops({"aten::sin"}, [&] { prior(po); });
    EXPECT_EQ(prior_ops.at("aten::sin"), 1) << "prior pipeline, 3 steps";

    auto decoder = DecoderPipeline::from_pretrained(test::data_path("tiny-wuerstchen"));
    DecoderOptions dopt = test::decoder_seed22_options(test::reference("pipeline_decoder_seed22"));
    dopt.num_inference_steps = 3;
    dopt.decode = false;
    const auto decoder_ops = count_ops({"aten::sin"}, [&] { decoder(dopt); });
    EXPECT_EQ(decoder_ops.at("aten::sin"), 1) << "decoder pipeline, 3 steps";
}

}  // namespace
}  // namespace wuerstchen
