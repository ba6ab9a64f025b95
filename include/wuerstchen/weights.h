#pragma once

// Loading diffusers / transformers weights into modules whose parameter names are the upstream
// key names. Every key and shape is compared explicitly; all problems are reported at once.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <optional>
#include <string>
#include <vector>

namespace wuerstchen {

struct LoadOptions {
    torch::Device device = torch::kCPU;
    torch::ScalarType dtype = torch::kFloat32;  // kFloat32, kFloat16 or kBFloat16 (kFloat64 runs)
    // Model offload: keep each stage on the CPU and move it to `device` only while it runs
    // (diffusers' enable_model_cpu_offload).
    bool offload = false;
    // Sequential offload (diffusers' enable_sequential_cpu_offload): weights stay on the CPU
    // (pinned when `device` is CUDA) and each block of the text encoders, prior and decoder
    // visits `device` only for its own forward, the next block's copy overlapping the current
    // block's compute on a side stream. A model's parts outside its blocks (embeddings, mappers,
    // output head), the small VQGAN as a whole and loaded LoRA adapters stay on `device` while
    // their stage runs. The smallest GPU footprint, at the cost of one weight transfer per block
    // and step. Exclusive with `offload`. No effect when `device` is the CPU.
    bool sequential_offload = false;
    // Replay each denoising step from a CUDA graph captured on its first use for a shape, batch
    // and guidance scale (cached per pipeline; a capture costs about two extra steps), and each
    // text encoder forward likewise per batch of prompts. Only on CUDA with libtorch 2.5 or
    // later, and only without offloading (the weights must stay put); ignored otherwise.
    bool cuda_graphs = false;
    // Channels-last (NHWC) memory order: the 4-D weights (convolutions) of the prior, decoder and
    // VQGAN are stored so, and the pipelines hand those models NHWC inputs, so convolutions,
    // layer norms and channelwise MLPs run without layout copies in between. Same results up to
    // the convolution algorithm's rounding; outputs come back in the usual NCHW order.
    bool channels_last = false;
    // Each self-attention block's keys and values of the text computed once per call, not at
    // every step (the condition then carries them, and a step projects only the image rows:
    // map_condition's project_kv). Unset: on the CPU only, where the products take most of a
    // step and it measured 6-9% faster per step at 512x512.
    std::optional<bool> project_text_kv;
};

// Whether the pipelines project the text's keys and values once per call on `device`:
// options.project_text_kv, by default on the CPU only.
bool projects_text_kv(const LoadOptions& options, const torch::Device& device);

// A 4-D floating tensor (weight or NCHW activation) in the memory order `options` ask for:
// channels-last for options.channels_last (a copy unless it is already), else `t` itself.
torch::Tensor in_memory_format(const torch::Tensor& t, const LoadOptions& options);

// Throws InvalidArgument for a dtype other than float32 / float16 / bfloat16 / float64, or a
// device that is neither the CPU nor an available CUDA device. The loaders check their options
// with it.
void check_load_options(const LoadOptions& options);

// Parses "fp32" / "float32", "fp16" / "float16" / "half", "bf16" / "bfloat16".
// Throws InvalidArgument naming the value otherwise.
torch::ScalarType parse_dtype(const std::string& name);
const char* dtype_label(torch::ScalarType dtype);  // "fp32", "fp16", "bf16"
// Parses "cpu", "cuda", "cuda:N". Throws InvalidArgument naming the value otherwise.
torch::Device parse_device(const std::string& name);

// The weight files of a component folder for a file stem such as "diffusion_pytorch_model" or
// "model": `<stem>.safetensors`, or the shards listed by `<stem>.safetensors.index.json`, or the
// `<stem>.fp16.safetensors` variant. Throws IoError naming the folder when none exists.
std::vector<std::string> find_weight_files(const std::string& dir, const std::string& stem);

// Copies the tensors of `files` into module's parameters and buffers (cast to options.dtype for
// floating tensors, moved to options.device). Keys the module lacks, keys the files lack and
// shape mismatches are gathered into one WeightError naming the file(s).
// Upstream legacy names are mapped by normalize_key (e.g. transformers' "text_model." prefix).
void load_weights(torch::nn::Module& module, const std::vector<std::string>& files,
                  const LoadOptions& options);

// Maps a checkpoint key to the module key: returns "" for keys that are known to be ignorable
// (e.g. "text_model.embeddings.position_ids").
std::string normalize_key(const std::string& key);

// While one is alive, the library's modules built on this thread leave their linear,
// convolution and embedding parameters unwritten (allocated at full size, never filled) instead
// of drawing libtorch's default initialization, which a loader overwrites anyway and which costs
// seconds per billion parameters (diffusers skips it the same way when loading). Only for code
// that writes every parameter next: load_weights does, and refuses files that lack one. The
// load_* functions and from_pretrained use it. Nests; other threads are unaffected.
class UninitializedParameters {
public:
    UninitializedParameters();
    ~UninitializedParameters();
    UninitializedParameters(const UninitializedParameters&) = delete;
    UninitializedParameters& operator=(const UninitializedParameters&) = delete;

    static bool active();  // on the calling thread
};

// A model (module holder) built from `config` under UninitializedParameters, for code that
// writes every parameter next.
template <typename Holder, typename Config>
Holder build_unwritten(const Config& config) {
    UninitializedParameters unwritten;
    return Holder(config);
}

// Puts a freshly built module in inference mode on options.device / options.dtype (and in
// channels-last order for options.channels_last).
void prepare_module(torch::nn::Module& module, const LoadOptions& options);

}  // namespace wuerstchen
