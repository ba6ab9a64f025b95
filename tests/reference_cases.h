#pragma once

// The call parameters of the pipeline references in tests/data/references, as
// /work/shared/tools/gen_fixtures.py made them (see tests/data/README.md). Shared by the CPU
// parity tests and the GPU tests so both check the very same calls; below them, the float16
// checks that CUDA and (libtorch 2.2+) the CPU share.

#include <iostream>
#include <string>
#include <vector>

#include "test_util.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/prior_pipeline.h"

namespace wuerstchen::test {

// pipeline_prior_seed0: the seed alone drives every draw.
inline PriorOptions prior_seed0_options() {
    PriorOptions o;
    o.prompt("horse");
    o.height = 256;
    o.width = 256;
    o.num_inference_steps = 4;
    o.guidance_scale = 4.0;
    o.seed = 0;
    return o;
}

// pipeline_decoder_seed22: the reference file holds the image embeddings it decoded.
inline DecoderOptions decoder_seed22_options(const SafeTensors& ref) {
    DecoderOptions o;
    o.image_embeddings = ref_tensor(ref, "image_embeddings");
    o.prompts = {"horse"};
    o.num_inference_steps = 3;
    o.guidance_scale = 0.0;
    o.seed = 22;
    return o;
}

// pipeline_decoder_cfg_neg_b2: two embeddings, one prompt, a negative prompt, guidance 3.
inline DecoderOptions decoder_cfg_neg_b2_options(const SafeTensors& ref) {
    DecoderOptions o;
    o.image_embeddings = ref_tensor(ref, "image_embeddings");
    o.prompts = {"a lighthouse"};
    o.negative_prompts = {"fog"};
    o.num_inference_steps = 2;
    o.guidance_scale = 3.0;
    o.seed = 32;
    return o;
}

// pipeline_combined_seed42: text to a 256x384 image.
inline CombinedOptions combined_seed42_options() {
    CombinedOptions o;
    o.prompts = {"Anthropomorphic cat dressed as a fire fighter"};
    o.height = 256;
    o.width = 384;
    o.prior_num_inference_steps = 3;
    o.num_inference_steps = 2;
    o.prior_guidance_scale = 4.0;
    o.decoder_guidance_scale = 0.0;
    o.seed = 42;
    return o;
}

// ------------------------------------------------------------------ float16 vs float32
//
// Shared by the CUDA tests and the CPU ones (libtorch 2.2+). Two effects keep a float16 run
// away from a float32 run of the same call, in diffusers as here:
// - the random draws are made in the model dtype, and torch's CPU sampler gives other numbers
//   for float16 than for float32 (not the float32 numbers rounded);
// - the noise ratio, and r * 10000 inside the r-embedding, are evaluated in the model dtype.
// So both runs get the same float32 initial latents (cast by the pipeline) and one step,
// t = 1 -> 0: the last step adds no noise, and 1 and 10000 are exact in float16. What is left
// is float16 arithmetic: text encoder, guidance, model, scheduler step, VQGAN.
//
// Tolerance: 2e-2 absolute on the images (in [0, 1]). The prior's image embeddings get 2e-2
// *relative to their scale* instead: they are 42 * latents - 1, and the step from t = 1
// multiplies by 1 / sqrt(alpha) = 100 what each prior output divides by |1 - b| + 1e-5
// (b from the model), so an absolute bound would depend on the random weights.
inline const std::vector<double> kFp16OneStep = {1.0, 0.0};
constexpr double kFp16Tol = 2e-2;

inline LoadOptions with_dtype(LoadOptions o, torch::ScalarType dtype) {
    o.dtype = dtype;
    return o;
}

// `base` names the device (and offload flags); the dtype is set here. `where` prefixes the
// printed errors ("cuda", "cpu").
inline void expect_prior_fp16_matches_fp32(const LoadOptions& base, const std::string& where) {
    PriorOptions o = prior_seed0_options();
    o.timesteps = kFp16OneStep;
    auto pipe32 = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"),
                                                 with_dtype(base, torch::kFloat32));
    auto pipe16 = PriorPipeline::from_pretrained(data_path("tiny-wuerstchen-prior"),
                                                 with_dtype(base, torch::kFloat16));
    o.latents = torch::randn({1, pipe32.prior()->config().c_in, pipe32.latent_size(o.height),
                              pipe32.latent_size(o.width)},
                             make_generator(11));
    const auto expected = pipe32(o).image_embeddings.to(torch::kCPU, torch::kFloat32);
    const auto out = pipe16(o).image_embeddings;
    EXPECT_EQ(out.scalar_type(), torch::kFloat16);
    EXPECT_EQ(out.device().type(), base.device.type());
    EXPECT_TRUE(all_close(where + " fp16 vs fp32 prior image_embeddings (relative)",
                          out.to(torch::kCPU, torch::kFloat32), expected,
                          scaled_tol(expected, kFp16Tol)));
}

// The decoder with guidance and a negative prompt (batch 2 in, 4 rows through the model).
inline void expect_decoder_fp16_matches_fp32(const LoadOptions& base, const std::string& where) {
    const auto ref = reference("pipeline_decoder_cfg_neg_b2");
    DecoderOptions o = decoder_cfg_neg_b2_options(ref);
    o.timesteps = kFp16OneStep;
    auto pipe32 = DecoderPipeline::from_pretrained(data_path("tiny-wuerstchen"),
                                                   with_dtype(base, torch::kFloat32));
    auto pipe16 = DecoderPipeline::from_pretrained(data_path("tiny-wuerstchen"),
                                                   with_dtype(base, torch::kFloat16));
    const auto steps = ref_tensor(ref, "step_latents");  // [steps, B, c, H, W]
    o.latents = torch::randn(steps[0].sizes(), make_generator(12));
    const auto expected = pipe32(o).images;
    const auto out = pipe16(o);
    EXPECT_EQ(out.latents.scalar_type(), torch::kFloat16);
    EXPECT_EQ(out.latents.device().type(), base.device.type());
    EXPECT_TRUE(
        all_close(where + " fp16 vs fp32 decoder images", out.images, expected, kFp16Tol));
}

// Text to image in float16 on the reference schedules: the pipeline runs, its embeddings stay
// finite, and it repeats itself. Nothing here is compared with float32: the decoder's initial
// latents are drawn inside the call, in float16 (see above), so a text-to-image run cannot be
// given float32's. The float16 arithmetic of both stages is compared by the two checks above.
inline void expect_combined_fp16_runs(const LoadOptions& base, const std::string& where) {
    auto pipe = CombinedPipeline::from_pretrained(data_path("tiny-wuerstchen-combined"),
                                                  with_dtype(base, torch::kFloat16));
    const auto out = pipe(combined_seed42_options());
    const auto ref = reference("pipeline_combined_seed42");
    const auto embeddings = out.image_embeddings.to(torch::kCPU, torch::kFloat32);
    EXPECT_EQ(out.image_embeddings.scalar_type(), torch::kFloat16);
    EXPECT_TRUE(torch::isfinite(embeddings).all().item<bool>());
    EXPECT_TRUE(torch::isfinite(out.images).all().item<bool>());
    EXPECT_GE(out.images.min().item<float>(), 0.0f);
    EXPECT_LE(out.images.max().item<float>(), 1.0f);
    EXPECT_EQ(out.images.sizes(), ref_tensor(ref, "images").sizes());
    const auto again = pipe(combined_seed42_options());
    EXPECT_TRUE(
        all_close(where + " fp16 combined_seed42 twice", again.images, out.images, kFp16Tol));
    // Printed for the record (the effects above decide it), not asserted.
    std::cout << "[ measure  ] " << where << " fp16 combined_seed42 vs fp32 reference: max abs "
              << "error " << max_abs_diff(out.images, ref_tensor(ref, "images")) << "\n";
}

}  // namespace wuerstchen::test
