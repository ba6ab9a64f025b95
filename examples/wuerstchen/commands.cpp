#include "commands.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <sched.h>
#include <sys/stat.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include "args.h"
#include "progress.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"
#include "wuerstchen/image.h"
#include "wuerstchen/safetensors.h"
#include "wuerstchen/scheduler.h"
#include "wuerstchen/weights.h"

namespace wuerstchen::cli {

namespace {

bool exists(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

bool is_dir(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void require_dir(const std::string& flag, const std::string& path) {
    if (path.empty()) throw UsageError("missing required flag '--" + flag + "'");
    if (!is_dir(path)) throw IoError(path + ": no such folder (--" + flag + ")");
}

// Parameter count and per-dtype element counts of a component folder, from the safetensors
// headers alone (nothing is loaded).
nlohmann::json weight_summary(const std::string& dir, const std::string& stem) {
    nlohmann::json out;
    std::vector<std::string> files;
    try {
        files = find_weight_files(dir, stem);
    } catch (const IoError&) {
        return out;
    }
    int64_t total = 0;
    std::map<std::string, int64_t> by_dtype;
    for (const auto& f : files) {
        const SafeTensors st = SafeTensors::open(f);
        for (const auto& key : st.keys()) {
            const TensorInfo& info = st.info(key);
            int64_t n = 1;
            for (int64_t d : info.shape) n *= d;
            total += n;
            by_dtype[dtype_name(info.dtype)] += n;
        }
    }
    out["files"] = files;
    out["parameters"] = total;
    out["dtypes"] = by_dtype;
    return out;
}

nlohmann::json component_info(const std::string& dir, const std::string& cls) {
    nlohmann::json c;
    c["class"] = cls;
    for (const char* name : {"config.json", "scheduler_config.json", "tokenizer_config.json"}) {
        const std::string path = dir + "/" + name;
        if (!exists(path)) continue;
        try {
            c[name] = nlohmann::json::parse(read_text_file(path));
        } catch (const nlohmann::json::exception& e) {
            throw ConfigError(path + ": invalid JSON: " + e.what());
        }
    }
    // Validate the configs the library would use, so `info` reports what loading would reject.
    if (cls == "WuerstchenPrior") PriorConfig::from_file(dir + "/config.json");
    if (cls == "WuerstchenDiffNeXt") DiffNeXtConfig::from_file(dir + "/config.json");
    if (cls == "PaellaVQModel") PaellaVQConfig::from_file(dir + "/config.json");
    if (cls == "CLIPTextModel" || cls == "CLIPTextModelWithProjection")
        CLIPTextConfig::from_file(dir + "/config.json");
    if (cls == "DDPMWuerstchenScheduler") SchedulerConfig::from_file(dir + "/scheduler_config.json");
    const nlohmann::json weights =
        weight_summary(dir, cls.rfind("CLIP", 0) == 0 ? "model" : "diffusion_pytorch_model");
    if (!weights.is_null()) c["weights"] = weights;
    return c;
}

std::vector<FlagSpec> common_flags() {
    return concat({load_flags(),
                   {{"seed", "S", "random seed (default: nondeterministic)"},
                    {"quiet", "", "no progress bars"}}});
}

std::vector<FlagSpec> prior_flags() {
    return {{"prompt", "TEXT", "the prompt"},
            {"negative-prompt", "TEXT", "what to avoid (used with guidance > 1)"},
            {"height", "PX", "image height, a multiple of 128 (default 1024)"},
            {"width", "PX", "image width, a multiple of 128 (default 1024)"},
            {"images", "N", "images per prompt (default 1)"},
            {"prior-steps", "N", "stage-C steps, evenly spaced (default: --prior-timesteps default)"},
            {"prior-timesteps", "default|LIST", "stage-C schedule: 'default' (DEFAULT_STAGE_C_TIMESTEPS, 29 steps) or comma-separated descending values in [0,1]"},
            {"prior-guidance", "G", "stage-C classifier-free guidance (default 4)"},
            {"lora", "FILE[:SCALE]", "stage-C LoRA (peft or kohya safetensors, or a folder with pytorch_lora_weights.safetensors), weight SCALE (default 1)", true}};
}

// --lora FILE[:SCALE] (repeatable): every adapter loaded into the prior pipeline and activated
// with its weight.
void apply_loras(const Args& args, PriorPipeline& prior) {
    std::vector<std::string> names;
    std::vector<double> weights;
    for (const std::string& spec : args.all("lora")) {
        std::string path = spec;
        double scale = 1.0;
        const auto colon = spec.find_last_of(':');
        if (colon != std::string::npos) {
            const std::string tail = spec.substr(colon + 1);
            char* end = nullptr;
            const double v = std::strtod(tail.c_str(), &end);
            if (!tail.empty() && *end == '\0' && std::isfinite(v)) {
                path = spec.substr(0, colon);
                scale = v;
            }
        }
        if (!exists(path)) {
            if (colon != std::string::npos && path == spec && exists(spec.substr(0, colon)))
                throw UsageError("--lora " + spec + ": '" + spec.substr(colon + 1) +
                                 "' is not a number (FILE[:SCALE])");
            throw IoError(path + ": no such file or folder (--lora " + spec + ")");
        }
        const std::string name = "lora" + std::to_string(names.size());
        prior.load_lora_weights(path, name, scale);
        names.push_back(name);
        weights.push_back(scale);
    }
    if (!names.empty()) prior.set_adapters(names, weights);
}

}  // namespace

std::vector<FlagSpec> concat(std::vector<std::vector<FlagSpec>> groups) {
    std::vector<FlagSpec> out;
    for (auto& g : groups) out.insert(out.end(), g.begin(), g.end());
    return out;
}

std::vector<FlagSpec> decoder_flags() {
    return {{"decoder-steps", "N", "stage-B steps (default 12)"},
            {"decoder-guidance", "G", "stage-B classifier-free guidance (default 0: off)"}};
}

std::vector<FlagSpec> load_flags() {
    return {
        {"device", "cpu|cuda", "where to run (default: cuda when available, else cpu)"},
        {"dtype", "fp32|fp16|bf16",
         "weight and activation dtype (default: fp16 on cuda, fp32 on cpu)"},
        {"offload", "", "keep each stage on the CPU and move it to the GPU only while it runs"},
        {"sequential-offload", "",
         "keep the weights on the CPU and move each block to the GPU only for its forward"},
        {"cuda-graphs", "", "replay each denoising step from a CUDA graph (captured once)"},
        {"channels-last", "", "keep convolution weights and activations in NHWC order"},
        {"project-text-kv", "on|off",
         "compute the attention blocks' keys and values of the text once per call instead of "
         "at every step (default: on for cpu, off for cuda)"},
        {"cudnn-benchmark", "",
         "let cuDNN time its algorithms for each convolution shape on first use and keep the "
         "fastest (a slower first run)"},
        {"threads", "N",
         "CPU threads for libtorch's kernels (default: libtorch's choice when OMP_NUM_THREADS or "
         "MKL_NUM_THREADS is set, else the physical cores this process may run on)"}};
}

namespace {

// The physical cores this process may run on: distinct (package, core) ids among the CPUs of
// its affinity mask (taskset, cpusets), capped by a cgroup v2 CPU quota (docker --cpus).
int usable_cores() {
    const int logical = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return logical;
    std::set<std::pair<long, long>> cores;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &set)) continue;
        const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
        long package = -1, core = -1;
        std::ifstream(dir + "physical_package_id") >> package;
        std::ifstream(dir + "core_id") >> core;
        cores.emplace(package, core >= 0 ? core : -2 - cpu);  // no topology: count the CPU
    }
    long n = static_cast<long>(cores.size());
    std::ifstream cpu_max("/sys/fs/cgroup/cpu.max");  // "max 100000" or "<quota> <period>"
    std::string quota;
    long period = 0;
    if (cpu_max >> quota >> period && quota != "max" && period > 0) {
        const long q = std::atol(quota.c_str());
        if (q > 0) n = std::min(n, (q + period - 1) / period);
    }
    return static_cast<int>(std::max(1L, n));
#else
    return logical;
#endif
}

// libtorch sizes its pool from the physical cores it detects, which can be 1 inside a VM; a
// CPU run then uses one core of several.
void set_threads(const Args& args) {
    if (args.has("threads")) {
        const int n = args.integer("threads", 1);
        const int logical = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
        if (n < 1 || n > logical)
            throw UsageError("--threads must be between 1 and the " + std::to_string(logical) +
                             " logical CPUs here, got " + std::to_string(n));
        at::set_num_threads(n);
    } else if (std::getenv("OMP_NUM_THREADS") == nullptr &&
               std::getenv("MKL_NUM_THREADS") == nullptr) {
        at::set_num_threads(usable_cores());
    }
}

}  // namespace

LoadOptions load_options(const Args& args) {
    set_threads(args);
    LoadOptions opts;
    const bool cuda = torch::cuda::is_available();
    const std::string device = args.str("device", cuda ? "cuda" : "cpu");
    try {
        opts.device = parse_device(device);
        if (opts.device.is_cuda() && !cuda)
            throw UsageError("--device " + device + ": CUDA is not available on this machine");
        opts.dtype = parse_dtype(args.str("dtype", opts.device.is_cuda() ? "fp16" : "fp32"));
    } catch (const InvalidArgument& e) {
        throw UsageError(std::string("--") + (std::string(e.what()).rfind("dtype", 0) == 0 ? "dtype" : "device") +
                         ": " + e.what());
    }
    opts.offload = args.has("offload");
    opts.sequential_offload = args.has("sequential-offload");
    opts.cuda_graphs = args.has("cuda-graphs");
    opts.channels_last = args.has("channels-last");
    if (args.has("project-text-kv")) {
        const std::string v = args.str("project-text-kv");
        if (v != "on" && v != "off")
            throw UsageError("--project-text-kv must be 'on' or 'off', got '" + v + "'");
        opts.project_text_kv = v == "on";
    }
    if (opts.offload && opts.sequential_offload)
        throw UsageError("--offload and --sequential-offload exclude each other: pass one");
    for (const char* flag : {"offload", "sequential-offload", "cuda-graphs", "cudnn-benchmark"})
        if (args.has(flag) && !opts.device.is_cuda())
            throw UsageError(std::string("--") + flag + " needs --device cuda");
    // Process-wide (torch.backends.cudnn.benchmark): a program, not a library, decides it.
    if (args.has("cudnn-benchmark")) at::globalContext().setBenchmarkCuDNN(true);
    return opts;
}

std::vector<double> parse_timesteps(const std::string& flag, const std::string& text) {
    if (text == "default") return kDefaultStageCTimesteps;
    std::vector<double> out;
    size_t start = 0;
    while (start <= text.size()) {
        const size_t comma = text.find(',', start);
        const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        char* end = nullptr;
        const double v = std::strtod(item.c_str(), &end);
        if (item.empty() || *end != '\0')
            throw UsageError("--" + flag + ": '" + item + "' is not a number (expected 'default' or a comma-separated list)");
        out.push_back(v);
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    try {  // as the pipelines will check them, but before any model loads
        check_timesteps(("--" + flag).c_str(), "LIST", out);
    } catch (const InvalidArgument& e) {
        throw UsageError(e.what());
    }
    return out;
}

int pixel_size(const Args& args, const std::string& flag) {
    const int v = args.integer(flag, 1024);
    // Sizes on a 128-pixel grid map exactly onto the stage-C latent grid (42.67 px per cell) and
    // back through stages B and A; others would silently come out at a different size.
    if (v <= 0 || v % 128 != 0)
        throw UsageError("--" + flag + " " + std::to_string(v) + ": must be a positive multiple of 128");
    return v;
}

namespace {

// Fills the prior half of the options shared by `generate` and `prior`.
void prior_options(const Args& args, CombinedOptions& o) {
    if (!args.has("prompt")) throw UsageError("missing required flag '--prompt'");
    o.prompts = {args.str("prompt")};
    if (args.has("negative-prompt")) o.negative_prompts = {args.str("negative-prompt")};
    o.height = pixel_size(args, "height");
    o.width = pixel_size(args, "width");
    o.num_images_per_prompt = args.integer("images", 1);
    if (o.num_images_per_prompt < 1) throw UsageError("--images must be at least 1");
    if (args.has("prior-steps") && args.has("prior-timesteps"))
        throw UsageError("give either --prior-steps or --prior-timesteps, not both");
    if (args.has("prior-steps")) {
        o.prior_num_inference_steps = args.integer("prior-steps", 60);
        if (o.prior_num_inference_steps < 1) throw UsageError("--prior-steps must be at least 1");
    } else {
        o.prior_timesteps = parse_timesteps("prior-timesteps", args.str("prior-timesteps", "default"));
    }
    o.prior_guidance_scale = args.number("prior-guidance", 4.0);
    o.seed = args.seed("seed");
}

void decoder_options(const Args& args, CombinedOptions& o) {
    o.num_inference_steps = args.integer("decoder-steps", 12);
    if (o.num_inference_steps < 1) throw UsageError("--decoder-steps must be at least 1");
    o.decoder_guidance_scale = args.number("decoder-guidance", 0.0);
}

// With prior guidance, an empty prompt makes both halves identical. The decoder's are not: its
// unconditional half also drops the image embeddings.
void check_prompt_with_guidance(const CombinedOptions& o) {
    if (o.prior_guidance_scale > 1 && !o.prompts.empty() &&
        o.prompts[0].find_first_not_of(" \t\n") == std::string::npos)
        throw UsageError(
            "--prompt is empty: with --prior-guidance > 1 the conditional and "
            "unconditional passes would be identical; give a prompt or set "
            "--prior-guidance 1");
}

// CLIP sees at most model_max_length tokens (bos + 75 + eos): like diffusers, say on stderr which
// part of a longer prompt is ignored (the library itself truncates silently).
void warn_truncated(const CLIPTokenizer& tokenizer, const std::vector<std::string>& prompts) {
    const size_t max_length = static_cast<size_t>(tokenizer.model_max_length());
    for (const auto& prompt : prompts) {
        const std::vector<int64_t> ids = tokenizer.encode(prompt);
        if (ids.size() <= max_length) continue;
        // The ids between the kept part (which ends with an eos in place of a token) and the eos.
        const std::vector<int64_t> removed(ids.begin() + static_cast<std::ptrdiff_t>(max_length) - 1,
                                           ids.end() - 1);
        std::fprintf(stderr,
                     "warning: a prompt has %zu tokens and CLIP reads %zu; this part is ignored: "
                     "\"%s\"\n",
                     ids.size(), max_length, tokenizer.decode(removed).c_str());
    }
}

StepCallback progress_callback(std::unique_ptr<Progress>& bar, const char* label, int total, bool quiet) {
    return [&bar, label, total, quiet](int step, double, torch::Tensor&) {
        if (!bar) bar = std::make_unique<Progress>(label, total, !quiet);
        bar->step(step + 1);
        if (step + 1 == total) bar->finish();
        return true;
    };
}

int prior_total(const CombinedOptions& o) {
    return o.prior_timesteps.empty() ? o.prior_num_inference_steps
                                     : static_cast<int>(o.prior_timesteps.size()) - 1;
}

void write_tensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
    std::vector<std::pair<std::string, torch::Tensor>> f32;
    for (const auto& [name, t] : tensors) f32.emplace_back(name, t.detach().to(torch::kCPU, torch::kFloat32));
    save_safetensors(path, f32, {{"producer", "libwuerstchen"}});
}

// An output named by `flag`, checked before any model loads: a file name in a writable folder,
// not a folder itself, writable if it exists, and for images ending in .png (the format
// written). Images of a batch get numbered names in the same folder.
void check_output(const std::string& flag, const std::string& path, bool png) {
    if (path.empty()) throw UsageError("--" + flag + " needs a file name");
    if (is_dir(path)) throw IoError(path + ": is a folder (--" + flag + " names a file)");
    if (png) {
        const auto dot = path.find_last_of('.');
        std::string ext = dot == std::string::npos || path.find('/', dot) != std::string::npos
                              ? std::string()
                              : path.substr(dot);
        std::transform(ext.begin(), ext.end(), ext.begin(),
                       [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        if (ext != ".png")
            throw UsageError("--" + flag + " " + path +
                             ": images are written as PNG; give a file name ending in .png");
    }
    const auto slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "."
                            : slash == 0               ? "/"
                                                       : path.substr(0, slash);
    if (!is_dir(dir)) throw IoError(dir + ": no such folder (--" + flag + " " + path + ")");
    if (::access(dir.c_str(), W_OK) != 0)
        throw IoError(dir + ": folder not writable (--" + flag + " " + path + ")");
    if (exists(path) && ::access(path.c_str(), W_OK) != 0)
        throw IoError(path + ": file not writable (--" + flag + ")");
}

}  // namespace

int run_generate(int argc, char** argv) {
    Args args("generate", concat({{{"model", "DIR", "a combined pipeline folder (prior_* + decoder parts)"},
                                   {"prior", "DIR", "a warp-ai/wuerstchen-prior style folder"},
                                   {"decoder", "DIR", "a warp-ai/wuerstchen style folder"}},
                                  prior_flags(), decoder_flags(), common_flags(),
                                  {{"output", "FILE", "PNG to write (default out.png; numbered when several)"},
                                   {"output-tensors", "FILE", "also write float32 image_embeddings and images [B,3,H,W] as safetensors"}}}));
    args.parse(argc, argv, 2);
    if (args.help()) {
        std::cout << args.usage("(--model DIR | --prior DIR --decoder DIR) --prompt TEXT [options]");
        return 0;
    }
    if (!args.positional().empty()) throw UsageError("unexpected argument '" + args.positional()[0] + "'");
    const bool combined = args.has("model");
    if (combined == (args.has("prior") || args.has("decoder")))
        throw UsageError("give either --model DIR or both --prior DIR and --decoder DIR");
    if (!combined && !(args.has("prior") && args.has("decoder")))
        throw UsageError("--prior and --decoder go together (or use --model DIR)");
    CombinedOptions o;
    prior_options(args, o);
    decoder_options(args, o);
    check_prompt_with_guidance(o);
    const std::string output = args.str("output", "out.png");
    check_output("output", output, /*png=*/true);
    if (args.has("output-tensors"))
        check_output("output-tensors", args.str("output-tensors"), /*png=*/false);
    const LoadOptions load = load_options(args);
    if (combined) require_dir("model", args.str("model"));
    else {
        require_dir("prior", args.str("prior"));
        require_dir("decoder", args.str("decoder"));
    }
    CombinedPipeline pipe = combined ? CombinedPipeline::from_pretrained(args.str("model"), load)
                                     : CombinedPipeline::from_pretrained(args.str("prior"), args.str("decoder"), load);
    apply_loras(args, pipe.prior_pipeline());
    warn_truncated(pipe.prior_pipeline().tokenizer(), o.prompts);
    warn_truncated(pipe.prior_pipeline().tokenizer(), o.negative_prompts);
    const bool quiet = args.has("quiet");
    std::unique_ptr<Progress> prior_bar, decoder_bar;
    o.prior_callback = progress_callback(prior_bar, "prior", prior_total(o), quiet);
    o.callback = progress_callback(decoder_bar, "decoder", o.num_inference_steps, quiet);
    const CombinedOutput out = pipe(o);
    for (const auto& path : save_pngs(output, out.images))
        if (!quiet) std::fprintf(stderr, "wrote %s\n", path.c_str());
    if (args.has("output-tensors")) {
        write_tensors(args.str("output-tensors"), {{"image_embeddings", out.image_embeddings}, {"images", out.images}});
        if (!quiet) std::fprintf(stderr, "wrote %s\n", args.str("output-tensors").c_str());
    }
    return 0;
}

int run_prior(int argc, char** argv) {
    Args args("prior", concat({{{"prior", "DIR", "a warp-ai/wuerstchen-prior style folder"}},
                               prior_flags(), common_flags(),
                               {{"output-tensors", "FILE", "safetensors file to write image_embeddings to (float32)"}}}));
    args.parse(argc, argv, 2);
    if (args.help()) {
        std::cout << args.usage("--prior DIR --prompt TEXT --output-tensors FILE [options]");
        return 0;
    }
    if (!args.positional().empty()) throw UsageError("unexpected argument '" + args.positional()[0] + "'");
    CombinedOptions o;
    prior_options(args, o);
    check_prompt_with_guidance(o);
    if (!args.has("output-tensors")) throw UsageError("missing required flag '--output-tensors'");
    check_output("output-tensors", args.str("output-tensors"), /*png=*/false);
    const LoadOptions load = load_options(args);
    require_dir("prior", args.str("prior"));
    PriorPipeline pipe = PriorPipeline::from_pretrained(args.str("prior"), load);
    apply_loras(args, pipe);
    warn_truncated(pipe.tokenizer(), o.prompts);
    warn_truncated(pipe.tokenizer(), o.negative_prompts);
    PriorOptions p = prior_options(o);
    std::unique_ptr<Progress> bar;
    p.callback = progress_callback(bar, "prior", prior_total(o), args.has("quiet"));
    const torch::Tensor emb = pipe(p).image_embeddings;
    write_tensors(args.str("output-tensors"), {{"image_embeddings", emb}});
    if (!args.has("quiet")) std::fprintf(stderr, "wrote %s\n", args.str("output-tensors").c_str());
    return 0;
}

int run_decode(int argc, char** argv) {
    Args args("decode", concat({{{"decoder", "DIR", "a warp-ai/wuerstchen style folder"},
                                 {"embeddings", "FILE", "safetensors with 'image_embeddings' (from `wuerstchen prior`)"},
                                 {"prompt", "TEXT", "the prompt (default empty)"},
                                 {"negative-prompt", "TEXT", "what to avoid (used with guidance > 1)"}},
                                decoder_flags(), common_flags(),
                                {{"output", "FILE", "PNG to write (numbered when several)"},
                                 {"output-tensors", "FILE", "also write float32 images [B,3,H,W] as safetensors"}}}));
    args.parse(argc, argv, 2);
    if (args.help()) {
        std::cout << args.usage("--decoder DIR --embeddings FILE --output out.png [options]");
        return 0;
    }
    if (!args.positional().empty()) throw UsageError("unexpected argument '" + args.positional()[0] + "'");
    if (!args.has("embeddings")) throw UsageError("missing required flag '--embeddings'");
    if (!args.has("output")) throw UsageError("missing required flag '--output'");
    check_output("output", args.str("output"), /*png=*/true);
    if (args.has("output-tensors"))
        check_output("output-tensors", args.str("output-tensors"), /*png=*/false);
    CombinedOptions o;
    decoder_options(args, o);
    const LoadOptions load = load_options(args);
    require_dir("decoder", args.str("decoder"));
    const SafeTensors file = SafeTensors::open(args.str("embeddings"));
    if (!file.contains("image_embeddings"))
        throw InvalidArgument(args.str("embeddings") + ": no tensor 'image_embeddings' (--embeddings)");
    DecoderPipeline pipe = DecoderPipeline::from_pretrained(args.str("decoder"), load);
    DecoderOptions d;
    d.image_embeddings = file.tensor("image_embeddings").to(torch::kFloat32).clone();
    d.prompts = {args.str("prompt", "")};
    if (args.has("negative-prompt")) d.negative_prompts = {args.str("negative-prompt")};
    warn_truncated(pipe.tokenizer(), d.prompts);
    warn_truncated(pipe.tokenizer(), d.negative_prompts);
    d.num_inference_steps = o.num_inference_steps;
    d.guidance_scale = o.decoder_guidance_scale;
    d.seed = args.seed("seed");
    std::unique_ptr<Progress> bar;
    d.callback = progress_callback(bar, "decoder", o.num_inference_steps, args.has("quiet"));
    const DecoderOutput out = pipe(d);
    for (const auto& path : save_pngs(args.str("output"), out.images))
        if (!args.has("quiet")) std::fprintf(stderr, "wrote %s\n", path.c_str());
    if (args.has("output-tensors")) {
        write_tensors(args.str("output-tensors"), {{"image_embeddings", d.image_embeddings}, {"images", out.images}});
        if (!args.has("quiet"))
            std::fprintf(stderr, "wrote %s\n", args.str("output-tensors").c_str());
    }
    return 0;
}

int run_tokenize(int argc, char** argv) {
    Args args("tokenize", {{"tokenizer", "DIR", "tokenizer folder (vocab.json + merges.txt, or tokenizer.json)"},
                           {"text", "TEXT", "text to tokenize", true},
                           {"max-length", "N", "pad/truncate length (default: model_max_length)"},
                           {"no-padding", "", "do not pad to max length"}});
    args.parse(argc, argv, 2);
    if (args.help()) {
        std::cout << args.usage("--tokenizer DIR --text TEXT [--text TEXT ...]")
                  << "\nPrints {\"input_ids\": [...], \"attention_mask\": [...]} (lists of lists for "
                     "several --text).\n";
        return 0;
    }
    if (!args.positional().empty()) throw UsageError("unexpected argument '" + args.positional()[0] + "'");
    require_dir("tokenizer", args.str("tokenizer"));
    if (!args.has("text")) throw UsageError("missing required flag '--text'");
    const CLIPTokenizer tokenizer = CLIPTokenizer::from_pretrained(args.str("tokenizer"));
    TokenizerOptions opts;
    opts.max_length = args.integer("max-length", -1);
    if (args.has("max-length") && opts.max_length < 2)
        throw UsageError("flag '--max-length' must be at least 2");
    opts.pad_to_max = !args.has("no-padding");
    const std::vector<std::string> texts = args.all("text");
    const BatchEncoding enc = tokenizer(texts, opts);
    auto rows = [](const torch::Tensor& t) {
        std::vector<std::vector<int64_t>> out;
        const torch::Tensor c = t.to(torch::kInt64).contiguous();
        for (int64_t i = 0; i < c.size(0); ++i) {
            const int64_t* p = c[i].data_ptr<int64_t>();
            out.emplace_back(p, p + c.size(1));
        }
        return out;
    };
    nlohmann::json j;
    const auto ids = rows(enc.input_ids);
    const auto mask = rows(enc.attention_mask);
    if (texts.size() == 1) {
        j["input_ids"] = ids[0];
        j["attention_mask"] = mask[0];
    } else {
        j["input_ids"] = ids;
        j["attention_mask"] = mask;
    }
    std::cout << j.dump() << std::endl;
    return 0;
}

int run_info(int argc, char** argv) {
    Args args("info", {});
    args.parse(argc, argv, 2);
    if (args.help()) {
        std::cout << args.usage("DIR")
                  << "\nPrints, as JSON, the pipeline class, each component's configs, parameter "
                     "count and dtypes\n(read from the safetensors headers; nothing is loaded).\n";
        return 0;
    }
    if (args.positional().size() != 1) throw UsageError("expects exactly one folder: wuerstchen info DIR");
    const std::string dir = args.positional()[0];
    if (!is_dir(dir)) throw IoError(dir + ": no such folder");
    nlohmann::json out;
    out["path"] = dir;
    const std::string index_path = dir + "/model_index.json";
    if (exists(index_path)) {
        const ModelIndex index = ModelIndex::from_file(index_path);
        out["class"] = index.class_name;
        const nlohmann::json raw = nlohmann::json::parse(read_text_file(index_path));
        for (const char* key : {"latent_mean", "latent_std", "resolution_multiple", "latent_dim_scale"})
            if (raw.contains(key)) out[key] = raw[key];
        int64_t total = 0;
        for (const auto& [name, pair] : index.components) {
            const std::string sub = dir + "/" + name;
            if (!is_dir(sub)) throw IoError(sub + ": component folder named in " + index_path + " is missing");
            nlohmann::json c = component_info(sub, pair[1]);
            if (c.contains("weights")) total += c["weights"]["parameters"].get<int64_t>();
            out["components"][name] = std::move(c);
        }
        out["parameters"] = total;
    } else {
        // A single component folder (e.g. prior/): guess its class from the config.
        std::string cls;
        if (exists(dir + "/config.json")) {
            const nlohmann::json cfg = nlohmann::json::parse(read_text_file(dir + "/config.json"), nullptr, false);
            if (cfg.is_object() && cfg.contains("_class_name") && cfg["_class_name"].is_string())
                cls = cfg["_class_name"].get<std::string>();
            else if (cfg.is_object() && cfg.contains("architectures") && cfg["architectures"].is_array() &&
                     !cfg["architectures"].empty() && cfg["architectures"][0].is_string())
                cls = cfg["architectures"][0].get<std::string>();
        } else if (exists(dir + "/scheduler_config.json")) {
            cls = "DDPMWuerstchenScheduler";
        }
        if (cls.empty()) throw IoError(dir + ": neither model_index.json nor a component config.json found");
        out["components"][cls] = component_info(dir, cls);
    }
    std::cout << out.dump(2) << std::endl;
    return 0;
}

}  // namespace wuerstchen::cli
