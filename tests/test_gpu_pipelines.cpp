// The tiny-model pipelines on CUDA against the same references as the CPU tests (label gpu).
// Every test skips with a printed reason when CUDA is not available.
//
// Tolerances:
// - fp32: 1e-3, as the CPU parity tests. TF32 is switched off for these (cuDNN convolutions use
//   it by default on Ampere and later, which alone moves the images by ~1e-3).
// - fp16: against fp32 on this device from the same latents in one step; the checks and their
//   tolerances are shared with the CPU (reference_cases.h, kFp16OneStep).
// - offload (model or sequential) and CUDA graphs: the same kernels on the same inputs, so the
//   same result (1e-6 in fp32, 1e-3 in fp16).
// - packed condition mappers (resident pipelines) against per-block mapping (offloading): the
//   same products grouped differently, whose rounding may differ (1e-5 in fp32, 2e-2 in fp16, the
//   fp16 parity bound).

#include <torch/cuda.h>

#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "reference_cases.h"
#include "test_util.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/prior_pipeline.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {
namespace {

using test::all_close;
using test::data_path;
using test::ref_tensor;
using test::reference;
using test::scaled_tol;

constexpr double kFp32Tol = 1e-3;

class GpuPipelines : public ::testing::Test {
protected:
    void SetUp() override {
        if (!torch::cuda::is_available())
            GTEST_SKIP() << "CUDA is not available (libtorch without CUDA or no GPU): GPU "
                            "pipeline tests skipped";
        no_tf32_.emplace();  // until the fixture ends
    }

    static LoadOptions on_cuda(torch::ScalarType dtype, bool offload = false,
                               bool sequential_offload = false, bool cuda_graphs = false) {
        LoadOptions o;
        o.device = torch::Device(torch::kCUDA);
        o.dtype = dtype;
        o.offload = offload;
        o.sequential_offload = sequential_offload;
        o.cuda_graphs = cuda_graphs;
        return o;
    }

private:
    std::optional<test::NoTf32> no_tf32_;
};

// The same calls as the CPU parity tests (reference_cases.h).

torch::Tensor host(const torch::Tensor& t) { return t.to(torch::kCPU, torch::kFloat32); }

TEST_F(GpuPipelines, PriorFp32MatchesReference) {
    auto pipe = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"),
                                               on_cuda(torch::kFloat32));
    const auto out = pipe(test::prior_seed0_options()).image_embeddings;
    EXPECT_TRUE(out.is_cuda());
    const auto expected = ref_tensor(reference("pipeline_prior_seed0"), "image_embeddings");
    EXPECT_TRUE(all_close("cuda fp32 prior_seed0 image_embeddings", host(out), expected,
                          scaled_tol(expected, kFp32Tol)));
}

TEST_F(GpuPipelines, DecoderFp32MatchesReference) {
    auto pipe =
        DecoderPipeline::from_pretrained(data_path("tiny-wuerstchen"), on_cuda(torch::kFloat32));
    const auto ref = reference("pipeline_decoder_seed22");
    const auto out = pipe(test::decoder_seed22_options(ref));
    EXPECT_TRUE(out.latents.is_cuda());
    EXPECT_TRUE(all_close("cuda fp32 decoder_seed22 images", out.images, ref_tensor(ref, "images"),
                          kFp32Tol));
}

TEST_F(GpuPipelines, DecoderCfgBatch2Fp32MatchesReference) {
    auto pipe =
        DecoderPipeline::from_pretrained(data_path("tiny-wuerstchen"), on_cuda(torch::kFloat32));
    const auto ref = reference("pipeline_decoder_cfg_neg_b2");
    EXPECT_TRUE(all_close("cuda fp32 decoder_cfg_neg_b2 images",
                          pipe(test::decoder_cfg_neg_b2_options(ref)).images,
                          ref_tensor(ref, "images"), kFp32Tol));
}

TEST_F(GpuPipelines, CombinedFp32MatchesReference) {
    auto pipe = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"),
                                                  on_cuda(torch::kFloat32));
    const auto out = pipe(test::combined_seed42_options());
    const auto ref = reference("pipeline_combined_seed42");
    EXPECT_TRUE(all_close("cuda fp32 combined_seed42 images", out.images, ref_tensor(ref, "images"),
                          kFp32Tol));
}

// fp16 against fp32 on this device from the same latents, one step (reference_cases.h).
TEST_F(GpuPipelines, PriorFp16MatchesFp32) {
    test::expect_prior_fp16_matches_fp32(on_cuda(torch::kFloat16), "cuda");
}

TEST_F(GpuPipelines, DecoderFp16MatchesFp32) {
    test::expect_decoder_fp16_matches_fp32(on_cuda(torch::kFloat16), "cuda");
}

// The reference schedules in fp16: the pipeline runs, stays finite, in range, and repeats.
TEST_F(GpuPipelines, CombinedFp16ReferenceScheduleRuns) {
    test::expect_combined_fp16_runs(on_cuda(torch::kFloat16), "cuda");
}

double same_kernels_tol(torch::ScalarType dtype) {
    // fp32: the same kernels on the same inputs. fp16: one ulp from a reduction whose order is
    // not fixed would show as ~1e-3 after the VQGAN, so that is the bound there.
    return dtype == torch::kFloat32 ? 1e-6 : 1e-3;
}

void expect_same_output(const std::string& what, const CombinedOutput& actual,
                        const CombinedOutput& expected, double tol) {
    EXPECT_TRUE(all_close(what + " images", actual.images, expected.images, tol));
    EXPECT_TRUE(all_close(what + " image_embeddings", host(actual.image_embeddings),
                          host(expected.image_embeddings),
                          scaled_tol(host(expected.image_embeddings), tol)));
}

// Replaces each parameter of the prior and the decoder by a copy of its own, which undoes
// pack_condition_mappers, pack_attention_projections and fold_effnet_mappers: their blocks then
// map the conditions one by one and project q, k, v separately, as offloaded ones do.
void unpack_condition_mappers(CombinedPipeline& pipe) {
    torch::NoGradGuard no_grad;
    for (torch::nn::Module* model :
         {static_cast<torch::nn::Module*>(pipe.prior_pipeline().prior().get()),
          static_cast<torch::nn::Module*>(pipe.decoder_pipeline().decoder().get())})
        for (auto& p : model->parameters()) p.set_data(p.detach().clone());
}

// Resident pipelines map the conditions of all blocks in one product each
// (pack_condition_mappers), project each attention's q, k, v in one
// (pack_attention_projections) and fold the decoder's effnet mappers into its residual blocks
// (fold_effnet_mappers); the same as separate products, up to rounding.
TEST_F(GpuPipelines, PackedMappersMatchPerBlock) {
    for (const auto dtype : {torch::kFloat32, torch::kFloat16}) {
        const std::string what = std::string("packed vs per-block mappers, ") + dtype_label(dtype);
        auto packed = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"),
                                                        on_cuda(dtype));
        auto per_block = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"),
                                                           on_cuda(dtype));
        unpack_condition_mappers(per_block);
        for (auto* pipe : {&packed, &per_block}) {
            const bool expected = pipe == &packed;
            for (torch::nn::Module* model :
                 {static_cast<torch::nn::Module*>(pipe->prior_pipeline().prior().get()),
                  static_cast<torch::nn::Module*>(pipe->decoder_pipeline().decoder().get())}) {
                EXPECT_EQ(test::stored_back_to_back(*model, "kv_mapper.1.weight"), expected)
                    << what;
                EXPECT_EQ(test::stored_back_to_back(*model, ".mapper.weight"), expected) << what;
                const auto layout = test::attention_projection_layout(*model);
                EXPECT_GT(layout.attention, 0) << what;
                EXPECT_EQ(layout.packed, expected ? layout.attention : 0) << what;
            }
            auto& decoder = pipe->decoder_pipeline().decoder();
            EXPECT_EQ(test::folded_layer_count(*decoder, decoder->config().effnet_embd) > 0,
                      expected)
                << what << ": effnet mappers folded";
        }
        expect_same_output(what, packed(test::combined_seed42_options()),
                           per_block(test::combined_seed42_options()),
                           dtype == torch::kFloat32 ? 1e-5 : 2e-2);
    }
}

// LoadOptions::offload (stage at a time) and sequential_offload (block at a time) keep every
// weight on the CPU between calls and give the same numbers.
TEST_F(GpuPipelines, OffloadMatchesResident) {
    for (const bool sequential : {false, true}) {
        for (const auto dtype : {torch::kFloat32, torch::kFloat16}) {
            const std::string what = std::string(sequential ? "sequential offload" : "offload") +
                                     " vs resident, " + dtype_label(dtype);
            auto resident = CombinedPipeline::from_pretrained(
                data_path("tiny-wuerstchen-combined"), on_cuda(dtype));
            unpack_condition_mappers(resident);  // offloaded blocks map their own conditions
            auto offloaded = CombinedPipeline::from_pretrained(
                data_path("tiny-wuerstchen-combined"),
                on_cuda(dtype, /*offload=*/!sequential, /*sequential_offload=*/sequential));
            const auto a = resident(test::combined_seed42_options());
            const auto b = offloaded(test::combined_seed42_options());
            expect_same_output(what, b, a, same_kernels_tol(dtype));
            // A second call (the prefetch of the first block carried over) repeats the first.
            expect_same_output(what + ", second call", offloaded(test::combined_seed42_options()),
                               a, same_kernels_tol(dtype));
            // Between calls the offloaded stages are back on the CPU (pinned when sequential).
            auto& prior = offloaded.prior_pipeline();
            auto& decoder = offloaded.decoder_pipeline();
            for (torch::nn::Module* m :
                 {static_cast<torch::nn::Module*>(prior.prior().get()),
                  static_cast<torch::nn::Module*>(prior.text_encoder().get()),
                  static_cast<torch::nn::Module*>(decoder.decoder().get()),
                  static_cast<torch::nn::Module*>(decoder.text_encoder().get()),
                  static_cast<torch::nn::Module*>(decoder.vqgan().get())}) {
                std::vector<torch::Tensor> tensors = m->parameters();
                for (const auto& b : m->buffers()) tensors.push_back(b);
                for (const auto& t : tensors) {
                    ASSERT_TRUE(t.is_cpu()) << what;
                    if (sequential) ASSERT_TRUE(t.is_pinned()) << what;
                }
            }
            EXPECT_TRUE(module_device(*resident.prior_pipeline().prior()).is_cuda()) << what;
        }
    }
}

// LoadOptions::cuda_graphs: capture on the first call of a shape, replay afterwards, the same
// numbers as eager; a new shape gets its own graph.
TEST_F(GpuPipelines, CudaGraphsMatchEager) {
    for (const auto dtype : {torch::kFloat32, torch::kFloat16}) {
        const std::string what = std::string("cuda graphs vs eager, ") + dtype_label(dtype);
        auto eager = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"),
                                                       on_cuda(dtype));
        auto graphed = CombinedPipeline::from_pretrained(
            data_path("tiny-wuerstchen-combined"),
            on_cuda(dtype, false, false, /*cuda_graphs=*/true));
        const auto expected = eager(test::combined_seed42_options());
        expect_same_output(what + " (capture)", graphed(test::combined_seed42_options()),
                           expected, same_kernels_tol(dtype));
        expect_same_output(what + " (replay)", graphed(test::combined_seed42_options()), expected,
                           same_kernels_tol(dtype));
        // Another prompt through the same graphs: the call's mapped text condition (a graph
        // input copied once per call) is the new one.
        CombinedOptions other_prompt = test::combined_seed42_options();
        other_prompt.prompts = {"A watercolor lighthouse at dawn"};
        expect_same_output(what + " (replay, another prompt)", graphed(other_prompt),
                           eager(other_prompt), same_kernels_tol(dtype));
        EXPECT_EQ(graphed.prior_pipeline().captured_graphs(), 1u) << what;
        EXPECT_EQ(graphed.decoder_pipeline().captured_graphs(), 1u) << what;
        EXPECT_EQ(eager.prior_pipeline().captured_graphs(), 0u) << what;
        // The text encoders too (a failed capture would have fallen back to eager, with none).
        EXPECT_EQ(graphed.prior_pipeline().captured_text_graphs(), 1u) << what;
        EXPECT_EQ(graphed.decoder_pipeline().captured_text_graphs(), 1u) << what;
        EXPECT_EQ(eager.prior_pipeline().captured_text_graphs(), 0u) << what;

        // Another shape and batch. Not 384x384: there the tiny random prior overflows float16
        // (its image embeddings reach inf in eager runs too, on the CPU with libtorch 2.6 as on
        // the H100), and NaN compares with nothing; at 256x512 they peak at 1.4e4 (CPU fp16).
        CombinedOptions larger = test::combined_seed42_options();
        larger.width = 512;
        larger.num_images_per_prompt = 2;
        const auto eager_larger = eager(larger);
        ASSERT_TRUE(torch::isfinite(host(eager_larger.image_embeddings)).all().item<bool>())
            << what << ": the eager run overflowed at the second shape";
        expect_same_output(what + " (second shape)", graphed(larger), eager_larger,
                           same_kernels_tol(dtype));
        EXPECT_EQ(graphed.prior_pipeline().captured_graphs(), 2u) << what;
        EXPECT_EQ(graphed.decoder_pipeline().captured_graphs(), 2u) << what;
        // One prompt at both shapes (the decoder encodes each distinct prompt once).
        EXPECT_EQ(graphed.prior_pipeline().captured_text_graphs(), 1u) << what;
        EXPECT_EQ(graphed.decoder_pipeline().captured_text_graphs(), 1u) << what;

        // Dropped, then captured anew on the next call.
        graphed.clear_graphs();
        EXPECT_EQ(graphed.prior_pipeline().captured_graphs(), 0u) << what;
        EXPECT_EQ(graphed.decoder_pipeline().captured_graphs(), 0u) << what;
        EXPECT_EQ(graphed.prior_pipeline().captured_text_graphs(), 0u) << what;
        EXPECT_EQ(graphed.decoder_pipeline().captured_text_graphs(), 0u) << what;
        expect_same_output(what + " (captured again after clear_graphs)",
                           graphed(test::combined_seed42_options()), expected,
                           same_kernels_tol(dtype));
        EXPECT_EQ(graphed.prior_pipeline().captured_graphs(), 1u) << what;
        EXPECT_EQ(graphed.decoder_pipeline().captured_graphs(), 1u) << what;
    }
}

// LoadOptions::channels_last on CUDA: fp32 matches the reference; fp16 with graphs matches the
// NCHW fp16 eager run up to the convolution algorithms' rounding (both see the same fp16 ratios).
TEST_F(GpuPipelines, ChannelsLastMatches) {
    LoadOptions fp32 = on_cuda(torch::kFloat32);
    fp32.channels_last = true;
    auto pipe = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"), fp32);
    const auto out = pipe(test::combined_seed42_options());
    const auto ref = reference("pipeline_combined_seed42");
    EXPECT_TRUE(all_close("cuda fp32 channels-last combined_seed42 images", out.images,
                          ref_tensor(ref, "images"), kFp32Tol));
    EXPECT_TRUE(out.images.is_contiguous());

    LoadOptions fp16 = on_cuda(torch::kFloat16, false, false, /*cuda_graphs=*/true);
    fp16.channels_last = true;
    auto nhwc = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"), fp16);
    auto nchw = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"),
                                                  on_cuda(torch::kFloat16));
    expect_same_output("cuda fp16 channels-last + graphs vs NCHW eager",
                       nhwc(test::combined_seed42_options()),
                       nchw(test::combined_seed42_options()), test::kFp16Tol);
}

// The text's keys and values projected once per call (LoadOptions::project_text_kv, the CPU's
// default) on CUDA: the fp32 reference's images, and with fp16 and graphs the per-step
// projection's. Step callbacks on a device given without an index ("cuda") pass the checks after
// each step when they change nothing, and an in-place edit of a weight the call mapped once is
// refused also where graphs replay the steps (no forward runs its checks there).
TEST_F(GpuPipelines, TextKeysAndValuesOncePerCallAndCallbackChecks) {
    LoadOptions fp32 = on_cuda(torch::kFloat32);
    fp32.project_text_kv = true;
    auto pipe = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"), fp32);
    const auto ref = reference("pipeline_combined_seed42");
    CombinedOptions o = test::combined_seed42_options();
    int steps = 0;
    o.prior_callback = o.callback = [&steps](int, double, torch::Tensor&) {
        ++steps;
        return true;
    };
    EXPECT_TRUE(all_close("cuda fp32 text keys and values once, combined_seed42 images",
                          pipe(o).images, ref_tensor(ref, "images"), kFp32Tol));
    EXPECT_GT(steps, 2);

    LoadOptions fp16 = on_cuda(torch::kFloat16, false, false, /*cuda_graphs=*/true);
    fp16.project_text_kv = true;
    auto once = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"), fp16);
    auto per_step = CombinedPipeline::from_pretrained(
        data_path("tiny-wuerstchen-combined"),
        on_cuda(torch::kFloat16, false, false, /*cuda_graphs=*/true));
    expect_same_output("cuda fp16 + graphs, text keys and values once vs per step",
                       once(test::combined_seed42_options()),
                       per_step(test::combined_seed42_options()), test::kFp16Tol);

    for (auto* graphed : {&once, &per_step}) {
        const bool projected = graphed == &once;
        const std::string name = projected ? "attention.to_k.weight" : "cond_mapper.0.weight";
        const torch::Tensor w = test::parameters_named(*graphed->prior_pipeline().prior(), name)[0];
        CombinedOptions edit = test::combined_seed42_options();
        edit.prior_callback = [&w](int, double, torch::Tensor&) {
            torch::NoGradGuard no_grad;
            torch::Tensor(w).mul_(1.0);  // a new version, the same values
            return true;
        };
        WUERSTCHEN_EXPECT_THROW_MSG((*graphed)(edit), InvalidArgument, "step callback after step 0",
                                    "in place", projected ? "keys and values" : "cond_mapper");
        // The decoder (2 steps): its projected keys and values (which also shows that it
        // projected), or the effnet mappers folded into its blocks' weights (the fold, checked
        // after the callback because a replay runs no forward's checks).
        const std::string decoder_name =
            projected ? "attention.to_k.weight" : "effnet_mappers.1.weight";
        const torch::Tensor d =
            test::parameters_named(*graphed->decoder_pipeline().decoder(), decoder_name)[0];
        edit = test::combined_seed42_options();
        edit.callback = [&d](int, double, torch::Tensor&) {
            torch::NoGradGuard no_grad;
            torch::Tensor(d).mul_(1.0);
            return true;
        };
        WUERSTCHEN_EXPECT_THROW_MSG((*graphed)(edit), InvalidArgument, "step callback after step 0",
                                    "in place",
                                    projected ? "keys and values" : "fold_effnet_mappers");
    }
}

// A LoRA change after capture drops the graphs: the next call matches an eager pipeline with
// the same adapter instead of replaying the old weights.
TEST_F(GpuPipelines, CudaGraphsFollowLoraChanges) {
    auto eager = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"),
                                                on_cuda(torch::kFloat32));
    auto graphed = PriorPipeline::from_pretrained(
        data_path("tiny-wuerstchen-prior"),
        on_cuda(torch::kFloat32, false, false, /*cuda_graphs=*/true));
    const auto before = graphed(test::prior_seed0_options()).image_embeddings;
    EXPECT_EQ(graphed.captured_graphs(), 1u);
    for (auto* pipe : {&eager, &graphed})
        pipe->load_lora_weights(data_path("lora/tiny-prior-lora"), "a", 1.0);
    const auto expected = host(eager(test::prior_seed0_options()).image_embeddings);
    const auto after = host(graphed(test::prior_seed0_options()).image_embeddings);
    EXPECT_TRUE(all_close("cuda graphs after LoRA load", after, expected,
                          scaled_tol(expected, 1e-6)));
    EXPECT_GT(test::max_abs_diff(after, host(before)), 1e-3) << "the adapter changed nothing";
    for (auto* pipe : {&eager, &graphed}) pipe->set_adapters({"a"}, {0.5});
    EXPECT_TRUE(all_close("cuda graphs after set_adapters",
                          host(graphed(test::prior_seed0_options()).image_embeddings),
                          host(eager(test::prior_seed0_options()).image_embeddings),
                          scaled_tol(expected, 1e-6)));
    // Fusing and unfusing replace weights, and the pipelines pack them again: new tensors the
    // graphs must not keep reading the old ones of.
    for (auto* pipe : {&eager, &graphed}) pipe->fuse_lora();
    EXPECT_TRUE(all_close(
        "cuda graphs after fuse_lora", host(graphed(test::prior_seed0_options()).image_embeddings),
        host(eager(test::prior_seed0_options()).image_embeddings), scaled_tol(expected, 1e-6)));
    for (auto* pipe : {&eager, &graphed}) pipe->unfuse_lora();
    EXPECT_TRUE(all_close("cuda graphs after unfuse_lora",
                          host(graphed(test::prior_seed0_options()).image_embeddings),
                          host(eager(test::prior_seed0_options()).image_embeddings),
                          scaled_tol(expected, 1e-6)));
}

// A second call with the same seed repeats the first: nothing of a call stays behind on the
// device (the noise comes from a fresh CPU generator each time).
TEST_F(GpuPipelines, SameSeedSameResultTwice) {
    auto pipe = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"),
                                                  on_cuda(torch::kFloat32));
    const auto a = pipe(test::combined_seed42_options());
    const auto b = pipe(test::combined_seed42_options());
    EXPECT_TRUE(all_close("cuda fp32 repeated call", b.images, a.images, 1e-6));
}

}  // namespace
}  // namespace wuerstchen
