#pragma once

// LoadOptions::cuda_graphs: one denoising step (the model forward with its guidance mix)
// captured as a CUDA graph per input signature and replayed afterwards, which removes the
// per-kernel launch cost that dominates small latents (stage C runs 24x24 at 1024x1024).
//
// A graph replays raw device pointers: its inputs are copied into the graph's own tensors on
// every replay, and the weights it reads must stay where they were at capture. The pipelines
// therefore key the cache on weights_fingerprint() (parameter storage and LoRA state) and do not
// use graphs while offloading. Capture (first use of a signature), in thread-local capture mode
// on one capture stream per device that all caches share, one capture at a time: one eager
// warm-up run (lazy cuBLAS / cuDNN set-up happens outside the capture), the capture, then one
// replay. (cuBLAS keeps a workspace per stream for the life of the process, 32 MiB on an H100:
// a stream per cache would hold one per pipeline and text encoder; graphs sharing a workspace
// therefore replay one after another, also when called on different streams.) Graphs of one
// cache share one memory pool (they never run concurrently). A capture that fails (the step throws)
// is ended cleanly, the error is passed on and the cache runs eagerly from then on.
//
// Needs a CUDA build of libtorch 2.5 or later; otherwise, or with inputs off CUDA, run() calls
// the step. Copies of a pipeline share one cache; its captures and replays are serialised.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "offload.h"
#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

class StepGraphs {
public:
    using Step = std::function<torch::Tensor(const std::vector<torch::Tensor>& inputs)>;

    StepGraphs();
    ~StepGraphs();
    StepGraphs(const StepGraphs&) = delete;
    StepGraphs& operator=(const StepGraphs&) = delete;

    // step(inputs), replayed from the graph of (inputs' shapes / dtypes / device, `key`),
    // captured on first use. The result is a fresh tensor (not the graph's output buffer).
    // `key` must name everything else the step depends on that is not an input (e.g. the
    // guidance scale and weights_fingerprint()).
    //
    // The last `constants` inputs are a call's constants (e.g. its mapped text condition): a
    // replay copies one into the graph's buffer only when it is another tensor object than the
    // one copied last, so a call that passes the same tensors at every step copies them once.
    // Their values must not change in place while they are in use.
    torch::Tensor run(const std::vector<torch::Tensor>& inputs, const std::string& key,
                      const Step& step, size_t constants = 0);

    // Drops every graph (and their memory) when `fingerprint` differs from the last one seen.
    void invalidate_unless(const std::string& fingerprint);

    // For one pipeline call whose steps run `model`: nothing unless LoadOptions::cuda_graphs is
    // set, the call runs on CUDA and nothing is offloaded; else the key of its graphs (see
    // guidance_key), after placing the model's LoRA adapters and dropping the graphs of
    // weights that changed since the last call.
    std::optional<std::string> prepare_call(const LoadOptions& options, OffloadMode mode,
                                            torch::Device device, torch::nn::Module& model,
                                            bool cfg, double guidance_scale);
    void clear();
    size_t size() const;

    // Whether this build can capture graphs (libtorch with CUDA).
    static bool supported();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// encode_prompts (wuerstchen/pipeline_common.h) with the text encoder's forward replayed from
// `graphs` when graphs->prepare_call allows it for these options, offload mode and device (no
// graphs: run directly).
// The text encoders run dozens of small kernels per layer on 77 tokens, so eagerly their time is
// the host's launch cost. Should a capture fail, this warns once and encodes eagerly (the cache
// stays off): the graphs only save time here.
torch::Tensor encode_prompts_graphed(const CLIPTokenizer& tokenizer, CLIPTextModel& text_encoder,
                                     const std::vector<std::string>& prompts, torch::Device device,
                                     torch::ScalarType dtype, StepGraphs* graphs,
                                     const LoadOptions& options, OffloadMode mode);

// A host tensor moved to `device`; to CUDA through page-locked memory, so that the copy is queued
// behind the stream's work instead of waiting for it (a copy from pageable memory synchronises the
// stream first). libtorch's host allocator keeps the page-locked block until the copy has run.
torch::Tensor to_device_queued(const torch::Tensor& host, torch::Device device);

// A graph key part for the guidance mix: exact (hexadecimal) scale, or none.
std::string guidance_key(bool cfg, double guidance_scale);

// Where the module's parameters and buffers live (storage pointers, dtypes, devices) and the
// state of its LoRA adapters (tensors, weights, active / enabled / merged flags).
std::string weights_fingerprint(const torch::nn::Module& module);

// A call maps its condition and modulations once, so a step callback must leave the denoising
// model's weights and LoRA state as they are. When enabled, this takes the model's
// weights_fingerprint before the steps, and check() throws InvalidArgument after a callback that
// replaced a parameter or changed the LoRA state, or after which `mapped_hold` throws
// InvalidArgument (the call's checks that its mapped condition and modulations still hold, which
// also catch weights they were mapped from changed in place; a CUDA graph's replay runs no
// checks of the forward).
class CallbackWeightsWatch {
public:
    CallbackWeightsWatch(const torch::nn::Module& model, bool enabled,
                         std::function<void()> mapped_hold = {});
    // `where`: the pipeline ("PriorPipeline"); `model`: its name in the message ("prior").
    void check(const std::string& where, const std::string& model, int step) const;

private:
    const torch::nn::Module& model_;
    bool enabled_;
    std::function<void()> mapped_hold_;
    std::string at_start_;
};

}  // namespace wuerstchen
