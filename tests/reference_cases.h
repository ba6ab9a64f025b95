#pragma once

// The call parameters of the pipeline references in tests/data/references, as
// /work/shared/tools/gen_fixtures.py made them (see tests/data/README.md). Shared by the CPU
// parity tests and the GPU tests so both check the very same calls.

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

}  // namespace wuerstchen::test
