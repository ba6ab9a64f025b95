#include "wuerstchen/pipeline_common.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>
#include <torch/version.h>

#include <cmath>
#include <limits>
#include <random>
#include <sstream>

#include "module_walk.h"
#include "step_graphs.h"
#include "wuerstchen/error.h"

namespace wuerstchen {

namespace {

[[noreturn]] void invalid(const char* where, const char* name, const std::string& what) {
    throw InvalidArgument(std::string(where) + ": `" + name + "` " + what);
}

}  // namespace

at::Generator make_generator(uint64_t seed) {
    return at::make_generator<at::CPUGeneratorImpl>(seed);
}

at::Generator call_generator(at::Generator* generator, std::optional<uint64_t> seed) {
    if (generator != nullptr) {
        if (seed.has_value())
            throw InvalidArgument("`seed` and `generator` are both set: pass one of them");
        if (!generator->defined() || generator->device().type() != c10::DeviceType::CPU)
            throw InvalidArgument("`generator` must be a CPU generator (draws happen on the CPU)");
        return *generator;
    }
    if (seed.has_value()) return make_generator(*seed);
    std::random_device rd;
    const uint64_t s = (static_cast<uint64_t>(rd()) << 32) ^ static_cast<uint64_t>(rd());
    return make_generator(s);
}

torch::Tensor randn_like_diffusers(at::IntArrayRef shape, at::Generator& generator,
                                   torch::ScalarType dtype, torch::Device device) {
    // randn_tensor draws in the target dtype on the generator's device (CPU): torch's CPU normal
    // kernel takes different paths per dtype, so a float16 draw is not a cast float32 draw.
    // The kernel locks the generator's mutex itself.
    auto noise = at::randn(shape, generator, torch::TensorOptions().dtype(dtype));
    return to_device_queued(noise, device);
}

torch::Tensor to_device_queued(const torch::Tensor& host, torch::Device device) {
    if (!device.is_cuda()) return host.to(device);
    return host.pin_memory().to(device, /*non_blocking=*/true);
}

torch::Tensor encode_prompts(const CLIPTokenizer& tokenizer, CLIPTextModel& text_encoder,
                             const std::vector<std::string>& prompts, torch::Device device,
                             torch::ScalarType dtype) {
    return encode_prompts_graphed(tokenizer, text_encoder, prompts, device, dtype, nullptr, {},
                                  OffloadMode::none);
}

torch::Tensor encode_prompts_graphed(const CLIPTokenizer& tokenizer, CLIPTextModel& text_encoder,
                                     const std::vector<std::string>& prompts, torch::Device device,
                                     torch::ScalarType dtype, StepGraphs* graphs,
                                     const LoadOptions& options, OffloadMode mode) {
    c10::InferenceMode guard;
    const auto key = graphs ? graphs->prepare_call(options, mode, device, *text_encoder,
                                                   /*cfg=*/false, 0.0)
                            : std::nullopt;
    TokenizerOptions tokenizing;  // padding="max_length", max_length=model_max_length, truncation
    BatchEncoding enc = tokenizer(prompts, tokenizing);
    const torch::Device te_device = module_device(*text_encoder);
    const std::vector<torch::Tensor> inputs = {to_device_queued(enc.input_ids, te_device),
                                               to_device_queued(enc.attention_mask, te_device)};
    auto forward = [&](const std::vector<torch::Tensor>& in) {
        return text_encoder->forward(in[0], in[1]).last_hidden_state;
    };
    torch::Tensor states;
    if (!key) {
        states = forward(inputs);
    } else {
        try {
            states = graphs->run(inputs, *key, forward);
        } catch (const std::exception& e) {
            // A failed capture turns the cache off; a real error recurs in the eager run.
            TORCH_WARN_ONCE("text encoder: CUDA graph capture failed, encoding eagerly: ",
                            e.what());
            states = forward(inputs);
        }
    }
    return states.to(device, dtype);
}

namespace {

// The first of the module's parameters (in Module::parameters() order) for which pred holds, or
// an undefined tensor.
template <class Pred>
torch::Tensor first_parameter(const torch::nn::Module& module, Pred pred) {
    torch::Tensor found;
    visit_modules(module, [&](const torch::nn::Module& m) {
        for (const auto& p : m.parameters(/*recurse=*/false))
            if (pred(p)) {
                found = p;
                return true;
            }
        return false;
    });
    return found;
}

}  // namespace

torch::Device module_device(const torch::nn::Module& module) {
    const auto p = first_parameter(module, [](const torch::Tensor&) { return true; });
    return p.defined() ? p.device() : torch::Device(torch::kCPU);
}

torch::ScalarType module_dtype(const torch::nn::Module& module) {
    const auto p =
        first_parameter(module, [](const torch::Tensor& t) { return t.is_floating_point(); });
    return p.defined() ? p.scalar_type() : torch::kFloat32;
}

std::vector<torch::Tensor> module_tensors(const torch::nn::Module& module) {
    std::vector<torch::Tensor> out, buffers;
    visit_modules(module, [&](const torch::nn::Module& m) {
        for (auto& p : m.parameters(/*recurse=*/false)) out.push_back(std::move(p));
        for (auto& b : m.buffers(/*recurse=*/false)) buffers.push_back(std::move(b));
        return false;
    });
    out.insert(out.end(), std::make_move_iterator(buffers.begin()),
               std::make_move_iterator(buffers.end()));
    return out;
}

OffloadGuard::OffloadGuard(torch::nn::Module& module, torch::Device device, bool enabled)
    : OffloadGuard(enabled ? module_tensors(module) : std::vector<torch::Tensor>{}, device) {}

OffloadGuard::OffloadGuard(const std::vector<torch::Tensor>& tensors, torch::Device device,
                           bool copy_all) {
    // set_data on a normal tensor from an inference tensor is refused: leave InferenceMode here.
    c10::InferenceMode not_inference(/*enabled=*/false);
    torch::NoGradGuard no_grad;
    try {
        for (const auto& t : tensors) {
            if (t.device() == device && !copy_all) continue;
            moved_.emplace_back(t, t.detach());
            moved_.back().first.set_data(t.to(device, /*non_blocking=*/false, /*copy=*/true));
        }
    } catch (...) {  // e.g. out of memory: what moved goes back (no destructor runs)
        for (auto& [registered, original] : moved_) registered.set_data(original);
        throw;
    }
}

OffloadGuard::~OffloadGuard() {
    try {
        c10::InferenceMode not_inference(/*enabled=*/false);
        for (auto& [registered, original] : moved_) registered.set_data(original);
    } catch (...) {  // a destructor must not throw; the module stays usable where it is
    }
}

torch::Tensor contiguous_on(const torch::Tensor& t, torch::Device device, torch::ScalarType dtype,
                            bool copy) {
    return t.to(device, dtype, /*non_blocking=*/false, copy, at::MemoryFormat::Contiguous);
}

std::string shape_string(at::IntArrayRef shape) {
    std::ostringstream os;
    os << '[';
    for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    os << ']';
    return os.str();
}

void check_positive(const char* where, const char* name, int64_t value) {
    if (value <= 0) invalid(where, name, "must be positive, got " + std::to_string(value));
}

void check_finite(const char* where, const char* name, double value) {
    if (!std::isfinite(value)) {
        std::ostringstream os;
        os << "must be finite, got " << value;
        invalid(where, name, os.str());
    }
}

void check_tokenizer_fits(const char* where, const CLIPTokenizer& tokenizer,
                          const CLIPTextModelImpl& text_encoder) {
    const CLIPTextConfig& config = text_encoder.config();
    if (tokenizer.max_token_id() >= config.vocab_size)
        throw InvalidArgument(std::string(where) + ": the tokenizer gives ids up to " +
                              std::to_string(tokenizer.max_token_id()) +
                              " but the text encoder's vocab_size is " +
                              std::to_string(config.vocab_size) + ": they are not a matching pair");
    if (tokenizer.model_max_length() > config.max_position_embeddings)
        throw InvalidArgument(std::string(where) + ": the tokenizer pads to " +
                              std::to_string(tokenizer.model_max_length()) +
                              " tokens but the text encoder's max_position_embeddings is " +
                              std::to_string(config.max_position_embeddings));
}

void check_guidance_scale(const char* where, const char* name, double value,
                          torch::ScalarType dtype) {
    check_finite(where, name, value);
    double largest = std::numeric_limits<float>::max();
    if (dtype == torch::kFloat16) largest = std::numeric_limits<c10::Half>::max();
    if (dtype == torch::kBFloat16) largest = std::numeric_limits<c10::BFloat16>::max();
    if (dtype == torch::kFloat64) largest = std::numeric_limits<double>::max();
    if (std::abs(value) > largest) {
        std::ostringstream os;
        os << "is " << value << ", beyond the largest " << c10::toString(dtype) << " (" << largest
           << ") that the guidance mix runs in";
        invalid(where, name, os.str());
    }
}

void check_allocatable(const char* where, const char* what, at::IntArrayRef shape,
                       torch::ScalarType dtype) {
    int64_t bytes = static_cast<int64_t>(c10::elementSize(dtype));
    bool overflow = false;
    for (const int64_t size : shape) {
        if (size < 1)
            throw InvalidArgument(std::string(where) + ": " + what + " give a tensor of shape " +
                                  shape_string(shape) + "; every size must be at least 1");
        overflow = overflow || __builtin_mul_overflow(bytes, size, &bytes);
    }
    if (overflow)
        throw InvalidArgument(std::string(where) + ": " + what + " give a tensor of shape " +
                              shape_string(shape) + ", too large to address (over 2^63 bytes)");
}

void check_timesteps(const char* where, const char* name, const std::vector<double>& timesteps) {
    if (timesteps.size() < 2)
        invalid(where, name,
                "needs at least 2 points (the last one ends the chain), got " +
                    std::to_string(timesteps.size()));
    for (size_t i = 0; i < timesteps.size(); ++i) {
        const double t = timesteps[i];
        std::ostringstream os;
        if (!std::isfinite(t) || t < 0.0 || t > 1.0) {
            os << "must lie in [0, 1], got " << t << " at index " << i;
            invalid(where, name, os.str());
        }
        if (i > 0 && !(t < timesteps[i - 1])) {
            os << "must be strictly descending, got " << timesteps[i - 1] << " then " << t
               << " at index " << i;
            invalid(where, name, os.str());
        }
    }
}

void check_dtype_on_device(const char* where, torch::ScalarType dtype, torch::Device device) {
// Half-precision CPU kernels for addmm / addcmul arrived in libtorch 2.2.
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 2)
    if (dtype == torch::kFloat16 && device.is_cpu())
        throw InvalidArgument(std::string(where) +
                              ": dtype fp16 on the CPU needs libtorch 2.2 or later (this is " +
                              TORCH_VERSION +
                              ", without half-precision CPU kernels); use bf16 or fp32 on the CPU");
#else
    (void)where;
    (void)dtype;
    (void)device;
#endif
}

void check_shape(const char* where, const char* name, const torch::Tensor& tensor,
                 at::IntArrayRef expected) {
    if (!tensor.defined()) invalid(where, name, "is undefined");
    if (tensor.sizes() != expected)
        invalid(
            where, name,
            "has shape " + shape_string(tensor.sizes()) + ", expected " + shape_string(expected));
}

}  // namespace wuerstchen
