// `wuerstchen bench`: times the text-to-image path stage by stage and prints one JSON object.
//
// The models are real folders (--model DIR, or --prior DIR --decoder DIR) or, with
// --random-weights, built from the configs of warp-ai/wuerstchen(-prior) (or tiny ones with
// --tiny) and filled with seeded random weights, so the real sizes can be timed without a
// download. The randomisation has the distribution of ../shared/tools/bench_diffusers.py (the
// diffusers anchor): 1-D "norm" weights 1, everything else N(0, 0.02).
//
// Each run calls the library's public stages in order, with a device synchronisation before
// every clock read:
//   text_encoding  both text encoders on the prompt (PriorPipeline / DecoderPipeline
//                  encode_prompt) and, for each stage with guidance, on the empty negative prompt
//                  (the prior's in one batch with the prompt, as its pipeline encodes texts)
//   prior_loop     PriorPipeline with those prompt_embeds: latents draw + stage-C loop
//   decoder_loop   DecoderPipeline with its prompt_embeds and decode = false: latents draw +
//                  stage-B loop
//   vq_decode      PaellaVQModel::decode of the latents, clamped and copied to the host as the
//                  pipeline does
//   total          one clock around the four (so it also holds the synchronisations)
//
// Each stage is a profiler user scope named "stage:<name>", and with --profile each block of the
// models one named "block:<type>" (scripts/profile-summary.py splits kernel time by both).

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <torch/cuda.h>
#include <torch/version.h>

#if defined(WUERSTCHEN_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#if defined(WUERSTCHEN_KINETO)
#include <torch/csrc/autograd/profiler_kineto.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include <unistd.h>  // rmdir

#include "args.h"
#include "commands.h"
#include "memory.h"
#include "wuerstchen/clip_text_model.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/config.h"
#include "wuerstchen/decoder_pipeline.h"
#include "wuerstchen/diffnext.h"
#include "wuerstchen/error.h"
#include "wuerstchen/paella_vq.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/prior_pipeline.h"
#include "wuerstchen/scheduler.h"
#include "wuerstchen/weights.h"

namespace wuerstchen::cli {

namespace {

namespace fs = std::filesystem;

// The model configs of one --random-weights build.
struct RandomConfigs {
    CLIPTextConfig prior_text;
    CLIPTextConfig decoder_text;
    PriorConfig prior;
    DiffNeXtConfig decoder;
    PaellaVQConfig vqgan;
};

CLIPTextConfig clip_text(int hidden, int layers, int heads, int intermediate) {
    CLIPTextConfig c;
    c.vocab_size = 49408;
    c.hidden_size = hidden;
    c.intermediate_size = intermediate;
    c.num_hidden_layers = layers;
    c.num_attention_heads = heads;
    c.max_position_embeddings = 77;
    c.hidden_act = "gelu";
    c.bos_token_id = 49406;
    c.eos_token_id = 49407;
    c.pad_token_id = 1;
    c.projection_dim = hidden;
    return c;
}

// warp-ai/wuerstchen-prior + warp-ai/wuerstchen: prior text encoder CLIP ViT-bigG text, stage C
// c 1536 / depth 32 / 24 heads, decoder text encoder CLIP ViT-H text, WuerstchenDiffNeXt and
// PaellaVQModel with their defaults.
RandomConfigs real_size_configs() {
    RandomConfigs c;
    c.prior_text = clip_text(1280, 32, 20, 5120);
    c.decoder_text = clip_text(1024, 24, 16, 4096);
    c.prior.c_in = 16;
    c.prior.c = 1536;
    c.prior.c_cond = 1280;
    c.prior.c_r = 64;
    c.prior.depth = 32;
    c.prior.nhead = 24;
    return c;
}

// The shapes of the tests/data fixtures (with the real vocabulary size, so the same token ids
// fit): every stage runs in milliseconds on a CPU.
RandomConfigs tiny_configs() {
    RandomConfigs c;
    c.prior_text = clip_text(32, 2, 2, 37);
    c.decoder_text = clip_text(24, 2, 2, 40);
    c.prior.c = 32;
    c.prior.c_cond = 32;
    c.prior.depth = 2;
    c.prior.nhead = 2;
    c.decoder.c_cond = 32;
    c.decoder.c_hidden = {16, 32};
    c.decoder.nhead = {-1, 2};
    c.decoder.blocks = {1, 2};
    c.decoder.level_config = {"CT", "CTA"};
    c.decoder.inject_effnet = {false, true};
    c.decoder.clip_embd = 24;
    c.decoder.dropout = {0.1, 0.1};
    c.vqgan.embed_dim = 32;
    c.vqgan.bottleneck_blocks = 2;
    c.vqgan.num_vq_embeddings = 64;
    return c;
}

bool ends_with(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// The seed of parameter `index` of a module whose weights are seeded with `seed`: splitmix64,
// so that neighbouring indices get independent streams.
uint64_t parameter_seed(uint64_t seed, int64_t index) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(index + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// bench_diffusers.py's randomize_ in distribution: 1-D norm weights 1, all other parameters
// N(0, 0.02). Each parameter draws from its own seed (parameter_seed), so the fill need not be
// one serial stream (which took about 10 s of each real-size bench process on a 2-core VM): on
// a GPU it runs there with its default generator, after the module has been moved (real-size
// loading on the H100 machine: 22 s, against 29 to 36 s with one CPU stream), and on the CPU one
// parameter per thread at a time. The same seed gives the same weights for any thread count on
// one device type. Buffers keep their initial values.
void randomize(torch::nn::Module& module, uint64_t seed) {
    const auto params = module.named_parameters().items();
    const int64_t count = static_cast<int64_t>(params.size());
    auto fill = [&](int64_t i, at::Generator generator) {
        const std::string& name = params[i].key();
        torch::Tensor p = params[i].value();
        if (p.dim() == 1 && name.find("norm") != std::string::npos && ends_with(name, "weight"))
            p.fill_(1.0);
        else
            p.normal_(0.0, 0.02, generator);
    };
    torch::NoGradGuard no_grad;
    if (count == 0) return;
    const torch::Device device = params[0].value().device();
    if (!device.is_cpu()) {
        // Kernel launches: a serial loop is enough.
        at::Generator generator = at::globalContext().defaultGenerator(device);
        for (int64_t i = 0; i < count; ++i) {
            {
                std::lock_guard<std::mutex> lock(generator.mutex());
                generator.set_current_seed(parameter_seed(seed, i));
            }
            fill(i, generator);
        }
        return;
    }
    std::atomic<int64_t> next{0};
    // One chunk per thread; each takes the next parameter until none is left (sizes vary a lot).
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        torch::NoGradGuard worker_no_grad;
        for (int64_t i = next++; i < count; i = next++)
            fill(i, make_generator(parameter_seed(seed, i)));
    });
}

// Builds one module with its parameters unwritten (randomize draws every one, so libtorch's
// default initialization would be wasted: about 14 s of CPU time at the real sizes) and
// randomises it: on the CPU in float32 before the cast when it stays there, else on its device,
// allocated there in its dtype and memory order (nothing crosses the bus). One module at a
// time, so that the host never holds more than one float32 copy.
template <typename Holder, typename Config>
Holder build_random(const Config& config, uint64_t seed, const LoadOptions& place) {
    Holder module = build_unwritten<Holder>(config);
    if (place.device.is_cpu()) {
        randomize(*module, seed);
    } else {
        torch::NoGradGuard no_grad;
        for (auto& p : module->parameters()) {
            const auto order = place.channels_last && p.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous;
            p.set_data(
                at::empty(p.sizes(), p.options().device(place.device).dtype(place.dtype), order));
        }
    }
    prepare_module(*module, place);
    if (!place.device.is_cpu()) randomize(*module, seed);
    return module;
}

// GPT-2's bytes_to_unicode alphabet (the 256 single-byte symbols of byte-level BPE) as UTF-8.
std::vector<std::string> byte_alphabet() {
    std::vector<int> printable;
    for (int b = '!'; b <= '~'; ++b) printable.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) printable.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) printable.push_back(b);
    std::vector<std::string> out;
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
        const bool kept = std::find(printable.begin(), printable.end(), b) != printable.end();
        const int cp = kept ? b : 256 + extra++;
        std::string utf8;
        if (cp < 0x80) {
            utf8 += static_cast<char>(cp);
        } else {
            utf8 += static_cast<char>(0xC0 | (cp >> 6));
            utf8 += static_cast<char>(0x80 | (cp & 0x3F));
        }
        out.push_back(utf8);
    }
    return out;
}

// A CLIP tokenizer without merges for --random-weights without --tokenizer: every byte is a
// token, bos / eos have CLIP's ids. Token ids only choose embedding rows, so the text encoders'
// cost is that of real prompts of the same length.
CLIPTokenizer byte_level_tokenizer() {
    nlohmann::json vocab = nlohmann::json::object();
    int id = 0;
    const auto alphabet = byte_alphabet();
    for (const auto& s : alphabet) vocab[s] = id++;
    for (const auto& s : alphabet) vocab[s + "</w>"] = id++;
    vocab["<|startoftext|>"] = 49406;
    vocab["<|endoftext|>"] = 49407;
    const nlohmann::json config = {{"bos_token", "<|startoftext|>"},
                                   {"eos_token", "<|endoftext|>"},
                                   {"unk_token", "<|endoftext|>"},
                                   {"pad_token", "<|endoftext|>"},
                                   {"model_max_length", 77}};
    std::string pattern = (fs::temp_directory_path() / "wuerstchen_bench_tok_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr)
        throw IoError(pattern + ": cannot create a temporary folder for the bench tokenizer");
    const fs::path dir(pattern);
    auto write = [&](const char* name, const std::string& text) {
        FILE* f = std::fopen((dir / name).c_str(), "wb");
        if (f == nullptr) throw IoError((dir / name).string() + ": cannot write");
        const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
        if (std::fclose(f) != 0 || !ok) throw IoError((dir / name).string() + ": cannot write");
    };
    // Cleaned up with the C library, not std::filesystem::remove_all: the PyTorch 2.11 wheel's
    // libtorch.so exports a copy of remove_all(path, error_code&) that the dynamic linker binds
    // this program's call to, and on the H100 machine that copy called through a null pointer.
    const std::array<const char*, 3> files = {"vocab.json", "merges.txt", "tokenizer_config.json"};
    auto clean_up = [&]() {
        for (const char* name : files) std::remove((dir / name).c_str());
        ::rmdir(dir.c_str());
    };
    std::optional<CLIPTokenizer> tokenizer;
    try {
        write(files[0], vocab.dump());
        write(files[1], "#version: 0.2\n");
        write(files[2], config.dump());
        tokenizer.emplace(CLIPTokenizer::from_pretrained(dir.string()));
    } catch (...) {
        clean_up();
        throw;
    }
    clean_up();
    return std::move(*tokenizer);
}

int64_t parameter_count(const torch::nn::Module& module) {
    int64_t n = 0;
    for (const auto& p : module.parameters()) n += p.numel();
    return n;
}

std::string device_name(torch::Device device) {
    if (!device.is_cuda()) return "cpu";
#if defined(WUERSTCHEN_WITH_CUDA)
    const int index = device.has_index() ? device.index() : c10::cuda::current_device();
    return at::cuda::getDeviceProperties(index)->name;
#else
    return "cuda (name unknown: the tool was built without libtorch's CUDA headers)";
#endif
}

// A profiler user scope (a "user_annotation" in the Chrome trace) for its lifetime; costs
// nothing beyond a check when no profiler is running.
class TraceScope {
public:
    explicit TraceScope(const std::string& name) : scope_(at::RecordScope::USER_SCOPE) {
        if (scope_.isActive()) scope_.before(name);
    }

private:
    at::RecordFunction scope_;
};

#if defined(WUERSTCHEN_KINETO)
// Around each block of a model (its offload units), a trace scope named after the block's type:
// "block:ResBlockStageB", "block:AttnBlock", ...
class BlockScopes final : public BlockHook {
public:
    void before(const torch::nn::Module& unit) override {
        std::string type = unit.name();
        const size_t colon = type.rfind("::");
        if (colon != std::string::npos) type = type.substr(colon + 2);
        if (type.size() > 4 && type.compare(type.size() - 4, 4, "Impl") == 0)
            type.resize(type.size() - 4);
        open_.push_back(std::make_unique<TraceScope>("block:" + type));
    }
    void after(const torch::nn::Module&) override {
        if (!open_.empty()) open_.pop_back();
    }

private:
    std::vector<std::unique_ptr<TraceScope>> open_;
};

// The CUDA kernels of a Chrome trace written by the Kineto profiler ("cat": "kernel", "dur" in
// microseconds): the `top` ones by total time, with calls and share of all kernel time.
nlohmann::json top_kernels(const std::string& trace_path, size_t top) {
    std::ifstream in(trace_path);
    if (!in) throw IoError(trace_path + ": cannot read the profile trace");
    nlohmann::json trace;
    try {
        in >> trace;
    } catch (const nlohmann::json::exception& e) {
        throw IoError(trace_path + ": the profile trace is not JSON: " + e.what());
    }
    struct Total {
        double us = 0;
        int64_t calls = 0;
    };
    std::map<std::string, Total> by_name;
    double all_us = 0;
    if (trace.contains("traceEvents") && trace["traceEvents"].is_array()) {
        for (const auto& e : trace["traceEvents"]) {
            if (!e.is_object() || e.value("cat", "") != "kernel" || !e.contains("dur") ||
                !e["dur"].is_number())
                continue;
            const double us = e["dur"].get<double>();
            Total& t = by_name[e.value("name", "?")];
            t.us += us;
            ++t.calls;
            all_us += us;
        }
    }
    std::vector<std::pair<std::string, Total>> sorted(by_name.begin(), by_name.end());
    std::sort(sorted.begin(), sorted.end(),
              [](const auto& a, const auto& b) { return a.second.us > b.second.us; });
    nlohmann::json kernels = nlohmann::json::array();
    for (size_t i = 0; i < sorted.size() && i < top; ++i) {
        const auto& [name, t] = sorted[i];
        kernels.push_back({{"name", name},
                           {"calls", t.calls},
                           {"total_ms", std::round(t.us) / 1e3},
                           {"share", all_us > 0 ? std::round(t.us / all_us * 1e3) / 1e3 : 0.0}});
    }
    return {{"trace", trace_path},
            {"kernel_time_ms", std::round(all_us) / 1e3},
            {"distinct_kernels", by_name.size()},
            {"top_kernels", kernels}};
}
#endif

nlohmann::json summary(const std::vector<double>& seconds) {
    std::vector<double> sorted = seconds;
    std::sort(sorted.begin(), sorted.end());
    const size_t n = sorted.size();
    const double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    auto round6 = [](double v) { return std::round(v * 1e6) / 1e6; };
    nlohmann::json runs = nlohmann::json::array();
    for (double s : seconds) runs.push_back(round6(s));
    return {{"median_s", round6(median)}, {"min_s", round6(sorted.front())}, {"runs", runs}};
}

int positive(const Args& args, const std::string& flag, int fallback, int minimum) {
    const int v = args.integer(flag, fallback);
    if (v < minimum) throw UsageError("--" + flag + " must be at least " + std::to_string(minimum));
    return v;
}

}  // namespace

int run_bench(int argc, char** argv) {
    Args args("bench", concat({
        {{"model", "DIR", "a combined pipeline folder (prior_* + decoder parts)"},
         {"prior", "DIR", "a warp-ai/wuerstchen-prior style folder"},
         {"decoder", "DIR", "a warp-ai/wuerstchen style folder"},
         {"random-weights", "",
          "build the real-size models (warp-ai/wuerstchen + wuerstchen-prior configs) with "
          "seeded random weights instead of loading folders"},
         {"tiny", "", "with --random-weights: the tiny test-fixture sizes instead (smoke runs)"},
         {"tokenizer", "DIR",
          "with --random-weights: a CLIP tokenizer folder (default: a byte-level one)"},
         {"prompt", "TEXT", "the prompt (default 'Anthropomorphic cat dressed as a fire fighter')"},
         {"height", "PX", "image height, a multiple of 128 (default 1024)"},
         {"width", "PX", "image width, a multiple of 128 (default 1024)"},
         {"batch", "N", "images per call (num_images_per_prompt; default 1)"},
         {"prior-steps", "N", "stage-C steps, evenly spaced (default: --prior-timesteps default)"},
         {"prior-timesteps", "default|LIST",
          "stage-C schedule: 'default' (DEFAULT_STAGE_C_TIMESTEPS, 29 steps) or "
          "comma-separated descending values in [0,1]"},
         {"prior-guidance", "G", "stage-C classifier-free guidance (default 4)"}},
        decoder_flags(),
        load_flags(),
        {{"seed", "S", "seed of the random weights and of every run's noise (default 0)"},
         {"warmup", "N", "untimed runs first (default 1)"},
         {"runs", "N", "timed runs (default 3)"},
         {"profile", "FILE",
          "profile one more run after the timed ones (CPU ops and CUDA kernels), write its "
          "Chrome trace to FILE and list the top CUDA kernels in the JSON (needs the "
          "wuerstchen_profile build: CUDA libtorch 2.x)"},
         {"quiet", "", "no progress lines on stderr"}}}));
    args.parse(argc, argv, 2);
    if (args.help()) {
        std::cout << args.usage(
                         "(--model DIR | --prior DIR --decoder DIR | --random-weights [--tiny]) "
                         "[options]")
                  << "\nPrints one JSON object: device, dtype, sizes, the median and minimum "
                     "seconds of each stage\n(text_encoding, prior_loop, decoder_loop, vq_decode) "
                     "and of the total, peak memory\n(overall and per stage: the CUDA caching "
                     "allocator, or libtorch's CPU allocator counted),\nparameter counts and the "
                     "seconds of each warm-up run (warmup_s; the first pays the\none-time set-up "
                     "and graph captures). text_encoding runs both text encoders; the loops\n"
                     "start from their states.\n";
        return 0;
    }
    if (!args.positional().empty())
        throw UsageError("unexpected argument '" + args.positional()[0] + "'");

    // ---- what to load
    const bool random = args.has("random-weights");
    const bool combined = args.has("model");
    const bool two = args.has("prior") || args.has("decoder");
    if (random + combined + two != 1)
        throw UsageError(
            "give exactly one of --model DIR, --prior DIR --decoder DIR, or --random-weights");
    if (two && !(args.has("prior") && args.has("decoder")))
        throw UsageError("--prior and --decoder go together (or use --model DIR)");
    if (args.has("tiny") && !random) throw UsageError("--tiny goes with --random-weights");
    if (args.has("tokenizer") && !random)
        throw UsageError("--tokenizer goes with --random-weights (folders bring their own)");

    // ---- call parameters
    const std::string prompt = args.str("prompt", "Anthropomorphic cat dressed as a fire fighter");
    const int height = pixel_size(args, "height");
    const int width = pixel_size(args, "width");
    const int batch = positive(args, "batch", 1, 1);
    if (args.has("prior-steps") && args.has("prior-timesteps"))
        throw UsageError("give either --prior-steps or --prior-timesteps, not both");
    std::vector<double> prior_timesteps;
    int prior_steps = 0;
    if (args.has("prior-steps")) {
        prior_steps = positive(args, "prior-steps", 60, 1);
    } else {
        prior_timesteps =
            parse_timesteps("prior-timesteps", args.str("prior-timesteps", "default"));
        prior_steps = static_cast<int>(prior_timesteps.size()) - 1;
    }
    const double prior_guidance = args.number("prior-guidance", 4.0);
    const int decoder_steps = positive(args, "decoder-steps", 12, 1);
    const double decoder_guidance = args.number("decoder-guidance", 0.0);
    const int warmup = positive(args, "warmup", 1, 0);
    const int runs = positive(args, "runs", 3, 1);
    const std::string profile_path = args.str("profile", "");
    if (args.has("profile")) {
#if !defined(WUERSTCHEN_KINETO)
        throw UsageError(
            "--profile needs the wuerstchen_profile build (a CUDA libtorch 2.x; cmake --build "
            "BUILD --target wuerstchen_profile)");
#endif
        if (profile_path.empty()) throw UsageError("--profile needs a file name");
    }
    const uint64_t seed = args.seed("seed").value_or(0);
    const bool quiet = args.has("quiet");
    const LoadOptions load = load_options(args);
    const torch::Device device = load.device;
    auto note = [quiet](const std::string& line) {
        if (!quiet) std::fprintf(stderr, "bench: %s\n", line.c_str());
    };

    // ---- models
    // On the CPU, count what libtorch's allocator hands out from here on (weights included).
    if (device.is_cpu()) track_cpu_memory();
    const auto load_start = std::chrono::steady_clock::now();
    std::optional<CombinedPipeline> pipe;
    std::string source;
    if (random) {
        const RandomConfigs cfg = args.has("tiny") ? tiny_configs() : real_size_configs();
        source = args.has("tiny") ? "random-tiny" : "random-real-size";
        note(std::string("building ") + (args.has("tiny") ? "tiny" : "real-size") +
             " models with random weights (seed " + std::to_string(seed) + ")");
        // Offloaded stages live on the CPU between uses (as from_pretrained loads them).
        LoadOptions place = load;
        if (load.offload || load.sequential_offload) place.device = torch::kCPU;
        // Each module has its own stream of seeds (seed, seed + 1 << 20, ...).
        const uint64_t stride = uint64_t{1} << 20;
        auto prior_text = build_random<CLIPTextModel>(cfg.prior_text, seed, place);
        auto prior = build_random<WuerstchenPrior>(cfg.prior, seed + stride, place);
        auto decoder_text = build_random<CLIPTextModel>(cfg.decoder_text, seed + 2 * stride, place);
        auto decoder = build_random<WuerstchenDiffNeXt>(cfg.decoder, seed + 3 * stride, place);
        auto vqgan = build_random<PaellaVQModel>(cfg.vqgan, seed + 4 * stride, place);
        const std::string tokenizer_dir = args.str("tokenizer");
        if (args.has("tokenizer") && !fs::is_directory(tokenizer_dir))
            throw IoError(tokenizer_dir + ": no such folder (--tokenizer)");
        const CLIPTokenizer tokenizer = args.has("tokenizer")
                                            ? CLIPTokenizer::from_pretrained(tokenizer_dir)
                                            : byte_level_tokenizer();
        PriorPipeline prior_pipe(tokenizer, prior_text, prior, DDPMWuerstchenScheduler(),
                                 PriorPipelineConfig{}, load);
        DecoderComponents parts{tokenizer, decoder_text, decoder, vqgan, SchedulerConfig{}, 10.67};
        pipe.emplace(std::move(prior_pipe),
                     DecoderPipeline::from_components(std::move(parts), load));
    } else if (combined) {
        source = args.str("model");
        if (!fs::is_directory(source)) throw IoError(source + ": no such folder (--model)");
        note("loading " + source);
        pipe.emplace(CombinedPipeline::from_pretrained(source, load));
    } else {
        for (const char* flag : {"prior", "decoder"})
            if (!fs::is_directory(args.str(flag)))
                throw IoError(args.str(flag) + ": no such folder (--" + flag + ")");
        source = args.str("prior") + " + " + args.str("decoder");
        note("loading " + source);
        pipe.emplace(
            CombinedPipeline::from_pretrained(args.str("prior"), args.str("decoder"), load));
    }
    const double load_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    PriorPipeline& prior = pipe->prior_pipeline();
    DecoderPipeline& decoder = pipe->decoder_pipeline();
    PaellaVQModel& vqgan = decoder.vqgan();

    // ---- one run, stage by stage
    auto sync = [device]() {
        if (device.is_cuda()) torch::cuda::synchronize(device.has_index() ? device.index() : -1);
    };
    using Clock = std::chrono::steady_clock;
    auto seconds = [](Clock::time_point a, Clock::time_point b) {
        return std::chrono::duration<double>(b - a).count();
    };
    const bool prior_cfg = prior_guidance > 1.0;
    const bool decoder_cfg = decoder_guidance > 1.0;
    // The stages in run order, as the JSON names them.
    constexpr size_t kStages = 4;
    const std::array<const char*, kStages> stage_names = {"text_encoding", "prior_loop",
                                                          "decoder_loop", "vq_decode"};
    std::array<std::vector<double>, kStages> t_stage;
    std::vector<double> t_total;
    std::vector<int64_t> embedding_shape, image_shape;
    // Peak memory of each stage over the timed runs (allocated, reserved): the peak is reset at
    // each stage's start, after the synchronisation that ends the stage before.
    std::array<PeakMemory, kStages> stage_peak;
    auto stage_done = [&](size_t stage, bool timed) {
        sync();
        if (timed) {
            const PeakMemory p = peak_memory(device);
            stage_peak[stage].allocated = std::max(stage_peak[stage].allocated, p.allocated);
            stage_peak[stage].reserved = std::max(stage_peak[stage].reserved, p.reserved);
        }
        const auto now = Clock::now();
        reset_peak_memory(device);
        return now;
    };
    auto run_once = [&](bool timed) {
        sync();
        reset_peak_memory(device);
        const auto t0 = Clock::now();
        auto scope = std::make_unique<TraceScope>("stage:text_encoding");
        // As PriorPipeline encodes prompt texts: with guidance, the prompt and the negative
        // prompt in one batch.
        torch::Tensor prompt_embeds, negative_embeds;
        if (prior_cfg) {
            const torch::Tensor both = prior.encode_prompt({prompt, ""});
            prompt_embeds = both.narrow(0, 0, 1);
            negative_embeds = both.narrow(0, 1, 1);
        } else {
            prompt_embeds = prior.encode_prompt({prompt});
        }
        torch::Tensor decoder_embeds = decoder.encode_prompt({prompt});
        torch::Tensor decoder_negative;
        if (decoder_cfg) decoder_negative = decoder.encode_prompt({""});
        const auto t1 = stage_done(0, timed);
        scope.reset();  // ended before the next one begins
        scope = std::make_unique<TraceScope>("stage:prior_loop");

        PriorOptions po;
        po.prompt_embeds = prompt_embeds;
        if (prior_cfg) po.negative_prompt_embeds = negative_embeds;
        po.height = height;
        po.width = width;
        if (prior_timesteps.empty())
            po.num_inference_steps = prior_steps;
        else
            po.timesteps = prior_timesteps;
        po.guidance_scale = prior_guidance;
        po.num_images_per_prompt = batch;
        po.seed = seed;
        const torch::Tensor embeddings = prior(po).image_embeddings;
        const auto t2 = stage_done(1, timed);
        scope.reset();
        scope = std::make_unique<TraceScope>("stage:decoder_loop");

        DecoderOptions dopt;
        dopt.image_embeddings = embeddings;
        dopt.prompts = {};
        dopt.prompt_embeds = decoder_embeds;
        if (decoder_cfg) dopt.negative_prompt_embeds = decoder_negative;
        dopt.num_inference_steps = decoder_steps;
        dopt.guidance_scale = decoder_guidance;
        dopt.seed = seed;
        dopt.decode = false;
        const torch::Tensor latents = decoder(dopt).latents;
        const auto t3 = stage_done(2, timed);
        scope.reset();
        scope = std::make_unique<TraceScope>("stage:vq_decode");

        const torch::Tensor images = decoder.decode_latents(latents);
        const auto t4 = stage_done(3, timed);
        scope.reset();

        embedding_shape = embeddings.sizes().vec();
        image_shape = images.sizes().vec();
        if (timed) {
            const std::array<Clock::time_point, kStages + 1> at = {t0, t1, t2, t3, t4};
            for (size_t i = 0; i < kStages; ++i) t_stage[i].push_back(seconds(at[i], at[i + 1]));
            t_total.push_back(seconds(t0, t4));
        }
        return seconds(t0, t4);
    };

    // The first warm-up also pays the one-time costs: CUDA / cuBLAS / cuDNN set-up and, with
    // --cuda-graphs, the graph captures.
    std::vector<double> t_warmup;
    for (int i = 0; i < warmup; ++i) {
        const double s = run_once(false);
        t_warmup.push_back(std::round(s * 1e6) / 1e6);
        note("warm-up " + std::to_string(i + 1) + "/" + std::to_string(warmup) + ": " +
             std::to_string(s) + " s");
    }
    for (int i = 0; i < runs; ++i) {
        const double s = run_once(true);
        note("run " + std::to_string(i + 1) + "/" + std::to_string(runs) + ": " +
             std::to_string(s) + " s");
    }
    // The stages cover each run: the run's peak is the largest stage peak.
    PeakMemory peak;
    for (const PeakMemory& p : stage_peak) {
        peak.allocated = std::max(peak.allocated, p.allocated);
        peak.reserved = std::max(peak.reserved, p.reserved);
    }

    nlohmann::json profile = nullptr;
#if defined(WUERSTCHEN_KINETO)
    if (!profile_path.empty()) {
        namespace prof = torch::autograd::profiler;
        using torch::profiler::impl::ActivityType;
        const std::set<ActivityType> activities = {ActivityType::CPU, ActivityType::CUDA};
        const prof::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
        prof::prepareProfiler(config, activities);
        // Block scopes on the models' block seams (sequential offload has its own hooks there).
        BlockScopes blocks;
        const std::array<BlockHook**, 4> seams = {
            &prior.text_encoder()->block_hook, &prior.prior()->block_hook,
            &decoder.text_encoder()->block_hook, &decoder.decoder()->block_hook};
        if (!load.sequential_offload)
            for (BlockHook** seam : seams) *seam = &blocks;
        prof::enableProfiler(config, activities);
        run_once(false);
        auto result = prof::disableProfiler();
        for (BlockHook** seam : seams)
            if (*seam == &blocks) *seam = nullptr;
        result->save(profile_path);
        note("profile trace written to " + profile_path);
        profile = top_kernels(profile_path, 15);
    }
#endif

    // ---- report
    nlohmann::json out;
    out["device"] = device_name(device);
    out["device_type"] = device.is_cuda() ? "cuda" : "cpu";
    if (!device.is_cuda()) out["cpu_threads"] = at::get_num_threads();
    out["dtype"] = dtype_label(module_dtype(*prior.prior()));
    out["batch"] = batch;
    out["height"] = height;
    out["width"] = width;
    out["resolution"] = std::to_string(height) + "x" + std::to_string(width);
    out["libtorch"] = TORCH_VERSION;
    out["weights"] = source;
    out["offload"] = load.sequential_offload ? "sequential" : load.offload ? "model" : "none";
    out["cuda_graphs"] = load.cuda_graphs;
    out["channels_last"] = load.channels_last;
    // What the steps did: nothing is mapped ahead while offloading.
    out["project_text_kv"] =
        projects_text_kv(load, device) && !load.offload && !load.sequential_offload;
    out["cudnn_benchmark"] = at::globalContext().benchmarkCuDNN();
    out["prior_steps"] = prior_steps;
    out["prior_timesteps"] = prior_timesteps.empty()                      ? "linspace"
                             : prior_timesteps == kDefaultStageCTimesteps ? "default"
                                                                          : "custom";
    out["prior_guidance"] = prior_guidance;
    out["decoder_steps"] = decoder_steps;
    out["decoder_guidance"] = decoder_guidance;
    out["warmup"] = warmup;
    out["warmup_s"] = t_warmup;
    out["runs"] = runs;
    out["image_embeddings_shape"] = embedding_shape;
    out["images_shape"] = image_shape;
    out["load_s"] = std::round(load_s * 1e3) / 1e3;
    for (size_t i = 0; i < kStages; ++i) out["stages"][stage_names[i]] = summary(t_stage[i]);
    out["total"] = summary(t_total);
    if (!profile.is_null()) out["profile"] = profile;
    auto gib = [](int64_t bytes) {
        return bytes < 0 ? nlohmann::json(nullptr)
                         : nlohmann::json(std::round(bytes / double(1 << 30) * 1e3) / 1e3);
    };
    if (peak.allocated >= 0) {
        // Tensors alive at once at the peak of each stage (weights included): the CUDA caching
        // allocator's statistics, or on the CPU libtorch's CPU allocator, counted.
        nlohmann::json& memory = out["peak_memory"];
        memory = {{"allocator", device.is_cuda() ? "cuda" : "cpu"},
                  {"bytes", peak.allocated},
                  {"gib", gib(peak.allocated)}};
        for (size_t i = 0; i < kStages; ++i) {
            memory["stages_gib"][stage_names[i]] = gib(stage_peak[i].allocated);
            memory["stages_bytes"][stage_names[i]] = stage_peak[i].allocated;
        }
    } else {
        out["peak_memory"] = nullptr;
    }
    if (device.is_cuda() && peak.allocated >= 0) {
        out["peak_cuda_memory_bytes"] = peak.allocated;
        out["peak_cuda_memory_gib"] = gib(peak.allocated);
        out["peak_cuda_reserved_bytes"] = peak.reserved;
    } else {
        out["peak_cuda_memory_bytes"] = nullptr;
        out["peak_cuda_memory_gib"] = nullptr;
        out["peak_cuda_reserved_bytes"] = nullptr;
    }
    const int64_t p_text = parameter_count(*prior.text_encoder());
    const int64_t p_prior = parameter_count(*prior.prior());
    const int64_t d_text = parameter_count(*decoder.text_encoder());
    const int64_t d_decoder = parameter_count(*decoder.decoder());
    const int64_t d_vq = parameter_count(*vqgan);
    out["parameters"] = {{"prior_text_encoder", p_text},
                         {"prior", p_prior},
                         {"decoder_text_encoder", d_text},
                         {"decoder", d_decoder},
                         {"vqgan", d_vq},
                         {"total", p_text + p_prior + d_text + d_decoder + d_vq}};
    out["stage_notes"] =
        "text_encoding: both text encoders on the prompt (+ the empty negative prompt for each "
        "stage with guidance); the loops start from those states; total is one clock around all "
        "four stages";
    std::cout << out.dump(2) << std::endl;
    return 0;
}

}  // namespace wuerstchen::cli
