#pragma once

// What the prior (stage C) and decoder (stage B) pipelines share: the step callback, the
// per-call random generator (CPU, so seeds match diffusers on any device), prompt encoding and
// argument validation that throws InvalidArgument naming the argument.

#include <ATen/core/Generator.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <new>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/clip_tokenizer.h"

namespace wuerstchen {

// Called after every denoising step with the step index, the step's timestep (the ratio the
// model saw, in [0, 1]) and the latents after the step. The callback may replace `latents` by a
// tensor of the same shape. Returning false cancels the call: it throws wuerstchen::Cancelled and
// the pipeline stays usable. A call maps its text condition and timestep modulations once, so the
// callback must not change the denoising model's weights or LoRA state: a replaced parameter or
// a changed LoRA state throws InvalidArgument after the callback (without offloading), unless no
// later step reads the mapped values. Weights changed in place are caught where a mapped value
// records them (the condition's mappers, the folded effnet mappers, the timestep mappers, and
// the attention projections whose keys and values were projected ahead) and have a version
// counter (not inference tensors), so do not make such changes either.
using StepCallback = std::function<bool(int step, double timestep, torch::Tensor& latents)>;

// A CPU generator seeded like torch.Generator().manual_seed(seed).
at::Generator make_generator(uint64_t seed);

// The generator of one call: `generator` when given (it must be a CPU generator; its state is
// shared and advances), else a fresh one from `seed`, else one seeded nondeterministically.
// Throws InvalidArgument when both are given or the generator is not on the CPU.
at::Generator call_generator(at::Generator* generator, std::optional<uint64_t> seed);

// diffusers' randn_tensor with a CPU generator: torch.randn(shape, generator=g, dtype=dtype) on the
// CPU (bit-identical to torch for the same generator state), then moved to `device` (to CUDA
// through pinned memory, without waiting for the device).
torch::Tensor randn_like_diffusers(at::IntArrayRef shape, at::Generator& generator,
                                   torch::ScalarType dtype = torch::kFloat32,
                                   torch::Device device = torch::kCPU);

// The pipelines' encode_prompt text path: tokenize with padding to max_length and truncation,
// run the text encoder on its device with the attention mask, return last_hidden_state
// [B, 77, hidden] on `device` in `dtype`. Runs under InferenceMode.
torch::Tensor encode_prompts(const CLIPTokenizer& tokenizer, CLIPTextModel& text_encoder,
                             const std::vector<std::string>& prompts, torch::Device device,
                             torch::ScalarType dtype);

// The device and floating dtype of a module's first parameter (CPU / float32 when it has none).
torch::Device module_device(const torch::nn::Module& module);
torch::ScalarType module_dtype(const torch::nn::Module& module);

// A module's parameters followed by its buffers (recursively), as registered.
std::vector<torch::Tensor> module_tensors(const torch::nn::Module& module);

// LoadOptions::offload: while alive, `module` sits on `device`; on destruction (also when the
// call throws) its parameters and buffers get their original tensors back (no copy back, and
// pinned memory stays pinned). Does nothing when `enabled` is false.
class OffloadGuard {
public:
    OffloadGuard(torch::nn::Module& module, torch::Device device, bool enabled);
    // The same for some registered tensors of a module; copy_all also copies those already on
    // `device` (a copy the caller wants regardless).
    OffloadGuard(const std::vector<torch::Tensor>& tensors, torch::Device device,
                 bool copy_all = false);
    ~OffloadGuard();
    OffloadGuard(const OffloadGuard&) = delete;
    OffloadGuard& operator=(const OffloadGuard&) = delete;

private:
    std::vector<std::pair<torch::Tensor, torch::Tensor>> moved_;  // {registered, original}
};

// ------------------------------------------------------------------------------ resources
// Runs one pipeline call and turns an allocation failure (CUDA out of memory, the CPU
// allocator's "not enough memory", std::bad_alloc) into wuerstchen::OutOfMemoryError naming
// `where` and suggesting remedies. Other errors pass through unchanged.
bool is_out_of_memory(const c10::Error& error);
[[noreturn]] void throw_out_of_memory(const char* where, const std::string& detail);

template <typename F>
auto with_memory_errors(const char* where, F&& call) -> decltype(call()) {
    try {
        return call();
    } catch (const std::bad_alloc&) {
        throw_out_of_memory(where, "std::bad_alloc");
    } catch (const c10::Error& e) {
        if (!is_out_of_memory(e)) throw;
        throw_out_of_memory(where, e.what_without_backtrace());
    }
}

// ------------------------------------------------------------------------------ validation
// Each throws InvalidArgument whose message starts with "<where>: `<name>`" (those without a
// name: "<where>: " and what does not fit).

void check_positive(const char* where, const char* name, int64_t value);
void check_finite(const char* where, const char* name, double value);
// The tokenizer's ids and padded length fit the text encoder: every id below its vocab_size,
// model_max_length within its max_position_embeddings.
void check_tokenizer_fits(const char* where, const CLIPTokenizer& tokenizer,
                          const CLIPTextModelImpl& text_encoder);
// A guidance scale: finite, and within the largest magnitude of `dtype`, the dtype its lerp of
// the two halves runs in.
void check_guidance_scale(const char* where, const char* name, double value,
                          torch::ScalarType dtype);
// A tensor the call would allocate: every size at least 1, and its byte count within int64
// (`what` says which arguments set the shape).
void check_allocatable(const char* where, const char* what, at::IntArrayRef shape,
                       torch::ScalarType dtype);
// Custom timesteps: at least two points, finite, within [0, 1], strictly descending.
void check_timesteps(const char* where, const char* name, const std::vector<double>& timesteps);
// The pipelines' dtype on their device: float16 on the CPU needs libtorch 2.2 or later (earlier
// versions lack half-precision CPU kernels: layer norm and convolution in 1.13, addmm / addcmul
// before 2.2); bfloat16 and float32 run anywhere.
void check_dtype_on_device(const char* where, torch::ScalarType dtype, torch::Device device);
// Tensor of exactly `expected` shape.
void check_shape(const char* where, const char* name, const torch::Tensor& tensor,
                 at::IntArrayRef expected);

// t on `device` in `dtype`, in contiguous (NCHW) memory order: a caller's latents in another
// layout would otherwise carry it into the outputs and choose other convolution kernels (other
// roundings). With `copy`, never the caller's memory (a callback's replacement latents may be a
// view of the caller's tensor).
torch::Tensor contiguous_on(const torch::Tensor& t, torch::Device device, torch::ScalarType dtype,
                            bool copy = false);

// Shape as "[2, 16, 6, 6]".
std::string shape_string(at::IntArrayRef shape);

}  // namespace wuerstchen
