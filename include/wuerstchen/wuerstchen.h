#pragma once

// libwuerstchen: Würstchen text-to-image (stage C -> B -> A), numerically equal to diffusers.
//
// Basic usage:
//
//   #include <wuerstchen/wuerstchen.h>
//
//   auto pipe = wuerstchen::CombinedPipeline::from_pretrained(
//       "wuerstchen-prior", "wuerstchen", {torch::kCUDA, torch::kFloat16});
//   wuerstchen::CombinedOptions options;
//   options.prompts = {"Anthropomorphic cat dressed as a fire fighter"};
//   options.height = options.width = 1024;
//   options.prior_timesteps = wuerstchen::kDefaultStageCTimesteps;
//   options.seed = 42;
//   auto out = pipe(options);                      // out.images: [1, 3, 1024, 1024] in [0, 1]
//   wuerstchen::save_pngs("cat.png", out.images);
//
// Each stage also works alone: PriorPipeline (text -> image embeddings), DecoderPipeline
// (image embeddings -> images), and the modules below them. Errors derive from
// wuerstchen::Error (error.h).

#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/config.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/error.h"
#include "wuerstchen/image.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/mapped_timesteps.h"
#include "wuerstchen/paella_vq.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/prior_pipeline.h"
#include "wuerstchen/safetensors.h"
#include "wuerstchen/scheduler.h"
#include "wuerstchen/weights.h"
