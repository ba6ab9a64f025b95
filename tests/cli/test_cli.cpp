// The `wuerstchen` command-line tool, run as a user would: the combined reference through
// `generate`, the README quickstart verbatim, `prior` vs `generate`, `tokenize`, and one-line
// errors with a non-zero exit for bad input.

#include <gtest/gtest.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>

#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>

#include "test_util.h"
#include "wuerstchen/safetensors.h"

namespace wuerstchen {
namespace {

struct CliResult {
    int status = -1;
    std::string out;
    std::string err;
};

std::string slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::string quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

// Runs a shell command line in `cwd`, capturing stdout and stderr.
CliResult run_shell(const std::string& command, const std::string& cwd) {
    const std::string dir = test::make_temp_dir("cli_io_");
    const std::string cmd = "cd " + quote(cwd) + " && " + command + " >" + dir + "/out 2>" + dir + "/err";
    CliResult r;
    const int raw = std::system(cmd.c_str());
    r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
    r.out = slurp(dir + "/out");
    r.err = slurp(dir + "/err");
    return r;
}

CliResult run_cli(const std::vector<std::string>& args, const std::string& cwd = "/tmp") {
    std::string cmd = quote(WUERSTCHEN_CLI);
    for (const auto& a : args) cmd += " " + quote(a);
    return run_shell(cmd, cwd);
}

std::string data(const std::string& rel) { return test::data_path(rel); }

// Each bad invocation exits non-zero and prints exactly one line naming the problem.
void expect_one_line_error(const CliResult& r, const std::vector<std::string>& fragments) {
    EXPECT_NE(r.status, 0);
    std::string err = r.err;
    while (!err.empty() && err.back() == '\n') err.pop_back();
    EXPECT_FALSE(err.empty());
    EXPECT_EQ(err.find('\n'), std::string::npos) << "more than one line: " << r.err;
    for (const auto& f : fragments) EXPECT_NE(err.find(f), std::string::npos) << "'" << err << "' lacks '" << f << "'";
}

TEST(CLI, GenerateMatchesCombinedReference) {
    const std::string dir = test::make_temp_dir("cli_gen_");
    const CliResult r = run_cli({"generate", "--model", data("tiny-wuerstchen-combined"), "--prompt",
                           "Anthropomorphic cat dressed as a fire fighter", "--height", "256", "--width", "384",
                           "--prior-steps", "3", "--decoder-steps", "2", "--prior-guidance", "4",
                           "--decoder-guidance", "0", "--seed", "42", "--device", "cpu", "--dtype", "fp32",
                           "--output", dir + "/cat.png", "--output-tensors", dir + "/cat.safetensors", "--quiet"});
    ASSERT_EQ(r.status, 0) << r.err;
    const SafeTensors out = SafeTensors::open(dir + "/cat.safetensors");
    const SafeTensors ref = test::reference("pipeline_combined_seed42");
    EXPECT_EQ(out.tensor("images").scalar_type(), torch::kFloat32);
    EXPECT_TRUE(test::all_close("CLI generate combined_seed42 images", out.tensor("images"),
                                test::ref_tensor(ref, "images"), 1e-3));
    int w = 0, h = 0, c = 0;
    unsigned char* png = stbi_load((dir + "/cat.png").c_str(), &w, &h, &c, 3);
    ASSERT_NE(png, nullptr);
    stbi_image_free(png);
    EXPECT_EQ(w, 384);
    EXPECT_EQ(h, 256);
}

// A prompt beyond CLIP's 77 tokens runs (truncated, as upstream) and stderr names the dropped
// part; a short one gets no warning.
TEST(CLI, WarnsAboutTruncatedPrompts) {
    const std::string dir = test::make_temp_dir("cli_trunc_");
    std::string long_prompt;
    for (int i = 0; i < 100; ++i) long_prompt += "cat ";
    long_prompt += "zebra";
    auto run_prior = [&](const std::string& prompt) {
        return run_cli({"prior", "--prior", data("tiny-wuerstchen-prior"), "--prompt", prompt,
                        "--height", "128", "--width", "128", "--prior-steps", "2", "--seed", "1",
                        "--device", "cpu", "--output-tensors", dir + "/e.safetensors", "--quiet"});
    };
    const CliResult long_run = run_prior(long_prompt);
    ASSERT_EQ(long_run.status, 0) << long_run.err;
    EXPECT_NE(long_run.err.find("warning: a prompt has"), std::string::npos) << long_run.err;
    EXPECT_NE(long_run.err.find("zebra"), std::string::npos) << long_run.err;
    const CliResult short_run = run_prior("cat zebra");
    ASSERT_EQ(short_run.status, 0) << short_run.err;
    EXPECT_EQ(short_run.err.find("warning"), std::string::npos) << short_run.err;
}

// The README's quickstart block (between the quickstart markers), run verbatim from a scratch
// folder with the build and data paths pointing into this checkout.
TEST(CLI, ReadmeQuickstartWritesPng) {
    const std::string readme = slurp(std::string(WUERSTCHEN_SOURCE_DIR) + "/README.md");
    const auto begin = readme.find("<!-- quickstart:begin -->");
    const auto end = readme.find("<!-- quickstart:end -->");
    ASSERT_NE(begin, std::string::npos) << "README.md lacks the quickstart markers";
    ASSERT_NE(end, std::string::npos);
    std::string block = readme.substr(begin, end - begin);
    const auto fence = block.find("```sh\n");
    ASSERT_NE(fence, std::string::npos);
    block = block.substr(fence + 6, block.find("```", fence + 6) - fence - 6);
    block = std::regex_replace(block, std::regex("\\\\\n\\s*"), "");
    const std::string command = block.substr(0, block.find('\n'));
    ASSERT_NE(command.find("wuerstchen generate"), std::string::npos) << command;
    std::smatch m;
    ASSERT_TRUE(std::regex_search(command, m, std::regex("--output (\\S+)")));
    const std::string png_name = m[1];
    ASSERT_TRUE(std::regex_search(command, m, std::regex("--height (\\d+) --width (\\d+)")));
    const int want_h = std::stoi(m[1]), want_w = std::stoi(m[2]);

    // The quickstart runs from the project root after `scripts/test.sh`: map its relative paths.
    std::string mapped = std::regex_replace(command, std::regex("(^|\\s)build/"),
                                            std::string("$1") + WUERSTCHEN_BINARY_DIR + "/");
    mapped = std::regex_replace(mapped, std::regex("(\\s)tests/data/"), std::string("$1") + data(""));
    const std::string dir = test::make_temp_dir("cli_quick_");
    const CliResult r = run_shell(mapped, dir);
    ASSERT_EQ(r.status, 0) << mapped << "\n" << r.err;
    int w = 0, h = 0, c = 0;
    unsigned char* png = stbi_load((dir + "/" + png_name).c_str(), &w, &h, &c, 3);
    ASSERT_NE(png, nullptr) << "no decodable PNG at " << dir << "/" << png_name;
    stbi_image_free(png);
    EXPECT_EQ(h, want_h);
    EXPECT_EQ(w, want_w);
}

TEST(CLI, PriorSavesSameEmbeddingsAsGenerate) {
    const std::string dir = test::make_temp_dir("cli_prior_");
    const std::vector<std::string> common = {"--prompt", "horse", "--height", "256", "--width", "256",
                                             "--prior-timesteps", "default", "--prior-guidance", "4",
                                             "--seed", "7", "--device", "cpu", "--quiet"};
    std::vector<std::string> gen = {"generate", "--prior", data("tiny-wuerstchen-prior"), "--decoder",
                                    data("tiny-wuerstchen"), "--decoder-steps", "2", "--output", dir + "/g.png",
                                    "--output-tensors", dir + "/g.safetensors"};
    gen.insert(gen.end(), common.begin(), common.end());
    std::vector<std::string> prior = {"prior", "--prior", data("tiny-wuerstchen-prior"), "--output-tensors",
                                      dir + "/p.safetensors"};
    prior.insert(prior.end(), common.begin(), common.end());
    const CliResult a = run_cli(gen), b = run_cli(prior);
    ASSERT_EQ(a.status, 0) << a.err;
    ASSERT_EQ(b.status, 0) << b.err;
    const auto ga = SafeTensors::open(dir + "/g.safetensors").tensor("image_embeddings");
    const auto pb = SafeTensors::open(dir + "/p.safetensors").tensor("image_embeddings");
    EXPECT_TRUE(test::all_close("prior vs generate image_embeddings", pb, ga, 0.0));

    // decode on the saved embeddings gives generate's images (same seed: the decoder's draws
    // follow the prior's in generate, so compare shapes and range only).
    const CliResult d = run_cli({"decode", "--decoder", data("tiny-wuerstchen"), "--embeddings", dir + "/p.safetensors",
                           "--prompt", "horse", "--decoder-steps", "2", "--seed", "7", "--device", "cpu",
                           "--output", dir + "/d.png", "--output-tensors", dir + "/d.safetensors", "--quiet"});
    ASSERT_EQ(d.status, 0) << d.err;
    const auto images = SafeTensors::open(dir + "/d.safetensors").tensor("images");
    EXPECT_EQ(images.sizes(), torch::IntArrayRef({1, 3, 256, 256}));
    EXPECT_GE(images.min().item<float>(), 0.0f);
    EXPECT_LE(images.max().item<float>(), 1.0f);
}

TEST(CLI, PriorWithLoraMatchesReference) {
    // lora_reference: "a red sports car", 256x256, 3 steps, guidance 4, seed 3 (gen_lora.py).
    const std::string dir = test::make_temp_dir("cli_lora_");
    const SafeTensors ref = SafeTensors::open(data("lora/lora_reference.safetensors"));
    for (const auto& [lora, key] : std::vector<std::pair<std::string, std::string>>{
             {"", "no_lora"}, {data("lora/tiny-prior-lora") + ":1", "lora_scale_1"}}) {
        std::vector<std::string> args = {"prior", "--prior", data("tiny-wuerstchen-prior"), "--prompt",
                                         "a red sports car", "--height", "256", "--width", "256",
                                         "--prior-steps", "3", "--prior-guidance", "4", "--seed", "3",
                                         "--device", "cpu", "--output-tensors", dir + "/" + key + ".safetensors",
                                         "--quiet"};
        if (!lora.empty()) args.insert(args.end(), {"--lora", lora});
        const CliResult r = run_cli(args);
        ASSERT_EQ(r.status, 0) << r.err;
        const torch::Tensor expected = test::ref_tensor(ref, key);
        EXPECT_TRUE(test::all_close("CLI prior " + key,
                                    SafeTensors::open(dir + "/" + key + ".safetensors").tensor("image_embeddings"),
                                    expected, test::scaled_tol(expected, 1e-3)));
    }
    expect_one_line_error(run_cli({"prior", "--prior", data("tiny-wuerstchen-prior"), "--prompt", "x",
                                   "--device", "cpu", "--output-tensors", dir + "/x.safetensors",
                                   "--lora", dir + "/missing.safetensors:0.5"}),
                          {"missing.safetensors"});
}

TEST(CLI, TokenizeEqualsReferences) {
    const SafeTensors ref = test::reference("tokenizer_tiny");
    const auto prompts = nlohmann::json::parse(ref.metadata().at("info"))["prompts"];
    const torch::Tensor ids = test::ref_tensor(ref, "prior.input_ids");
    const torch::Tensor mask = test::ref_tensor(ref, "prior.attention_mask");
    for (size_t i = 0; i < prompts.size(); ++i) {
        const CliResult r = run_cli({"tokenize", "--tokenizer", data("tiny-wuerstchen-prior/tokenizer"), "--text",
                               prompts[i].get<std::string>()});
        ASSERT_EQ(r.status, 0) << r.err;
        const auto j = nlohmann::json::parse(r.out);
        const auto got_ids = j["input_ids"].get<std::vector<int64_t>>();
        const auto got_mask = j["attention_mask"].get<std::vector<int64_t>>();
        ASSERT_EQ(got_ids.size(), 77u);
        for (int64_t k = 0; k < 77; ++k) {
            EXPECT_EQ(got_ids[k], ids[i][k].item<int64_t>()) << "prompt " << i << " position " << k;
            EXPECT_EQ(got_mask[k], mask[i][k].item<int64_t>()) << "prompt " << i << " position " << k;
        }
    }
}

TEST(CLI, InfoListsComponents) {
    const CliResult r = run_cli({"info", data("tiny-wuerstchen")});
    ASSERT_EQ(r.status, 0) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["class"], "WuerstchenDecoderPipeline");
    EXPECT_EQ(j["components"]["decoder"]["config.json"]["c_hidden"], nlohmann::json::array({16, 32}));
    EXPECT_GT(j["components"]["vqgan"]["weights"]["parameters"].get<int64_t>(), 0);
    EXPECT_GT(j["components"]["vqgan"]["weights"]["dtypes"]["F32"].get<int64_t>(), 0);
}

TEST(CLI, ErrorsAreOneLineAndNonZero) {
    expect_one_line_error(run_cli({"generate", "--model", "/nonexistent/model", "--prompt", "x", "--device", "cpu"}),
                          {"/nonexistent/model"});
    // A weight file that is not safetensors.
    const std::string dir = test::make_temp_dir("cli_bad_");
    ASSERT_EQ(std::system(("cp -r " + quote(data("tiny-wuerstchen-prior")) + " " + quote(dir + "/prior")).c_str()), 0);
    test::write_file(dir + "/prior/prior/diffusion_pytorch_model.safetensors", "this is not a safetensors file");
    expect_one_line_error(run_cli({"prior", "--prior", dir + "/prior", "--prompt", "x", "--device", "cpu",
                                   "--output-tensors", dir + "/e.safetensors", "--quiet"}),
                          {"diffusion_pytorch_model.safetensors"});
    expect_one_line_error(run_cli({"generate", "--model", data("tiny-wuerstchen-combined"), "--prompt", "x",
                                   "--height", "1000", "--device", "cpu"}),
                          {"--height 1000", "multiple of 128"});
    expect_one_line_error(run_cli({"generate", "--model", data("tiny-wuerstchen-combined"), "--prompt", "x",
                                   "--frobnicate", "3"}),
                          {"unknown flag '--frobnicate'"});
    expect_one_line_error(run_cli({"generate", "--model", data("tiny-wuerstchen-combined"), "--prompt", "",
                                   "--prior-guidance", "4", "--device", "cpu"}),
                          {"--prompt is empty", "guidance"});
    expect_one_line_error(run_cli({"frobnicate"}), {"unknown command 'frobnicate'"});
    expect_one_line_error(run_cli({"decode", "--decoder", data("tiny-wuerstchen"), "--embeddings",
                                   data("tiny-wuerstchen/model_index.json"), "--output", dir + "/x.png", "--device", "cpu"}),
                          {"model_index.json"});
    expect_one_line_error(run_cli({"generate", "--model", data("tiny-wuerstchen-combined"), "--prompt", "x",
                                   "--seed", "-3"}),
                          {"--seed"});
    expect_one_line_error(run_cli({"generate", "--model", data("tiny-wuerstchen-combined"),
                                   "--prompt", "x", "--seed", " -1"}),
                          {"--seed"});
    expect_one_line_error(run_cli({"generate", "--model", data("tiny-wuerstchen-combined"),
                                   "--prompt", "x", "--seed", "+"}),
                          {"--seed"});
}

// Problems the CLI can see in its arguments are usage errors (exit 2) found before any model
// loads: outputs that cannot be written or are not PNG names, bad schedules, a flag where a
// value belongs.
TEST(CLI, ArgumentProblemsFoundBeforeLoading) {
    const std::string dir = test::make_temp_dir("cli_args_");
    // A model folder that does not exist: these must fail on their own problem first.
    const std::vector<std::string> base = {
        "generate", "--model", "/nonexistent/model", "--prompt", "x", "--device", "cpu"};
    auto with = [&](std::vector<std::string> extra) {
        std::vector<std::string> args = base;
        args.insert(args.end(), extra.begin(), extra.end());
        return run_cli(args);
    };
    CliResult r = with({"--output", dir + "/out.jpg"});
    expect_one_line_error(r, {"--output", "out.jpg", ".png"});
    EXPECT_EQ(r.status, 2);
    expect_one_line_error(with({"--output", ""}), {"--output needs a file name"});
    expect_one_line_error(with({"--output", dir}), {dir, "is a folder"});
    expect_one_line_error(with({"--output-tensors", dir}), {dir, "is a folder"});
    if (::geteuid() != 0) {  // root writes anywhere
        ASSERT_EQ(::chmod(dir.c_str(), 0500), 0);
        expect_one_line_error(with({"--output", dir + "/out.png"}),
                              {dir, "not writable", "--output"});
        ASSERT_EQ(::chmod(dir.c_str(), 0700), 0);
    }
    for (const char* bad : {"0,0.5,1", "nan,0", "0.5", "1.5,0"}) {
        r = with({"--prior-timesteps", bad});
        expect_one_line_error(r, {"--prior-timesteps"});
        EXPECT_EQ(r.status, 2) << bad;
    }
    r = run_cli(
        {"generate", "--model", data("tiny-wuerstchen-combined"), "--prompt", "--seed", "3"});
    expect_one_line_error(r, {"'--prompt' needs a value", "'--seed'"});
    expect_one_line_error(
        run_cli({"decode", "--decoder", "/nonexistent/decoder", "--embeddings", "e.safetensors",
                 "--output", dir + "/x.png", "--output-tensors", dir, "--device", "cpu"}),
        {dir, "is a folder"});
    test::remove_tree(dir);
}

// Decoder guidance with an empty prompt is two different passes (the unconditional one also
// drops the image embeddings): allowed, unlike prior guidance.
TEST(CLI, EmptyPromptWithDecoderGuidanceOnly) {
    const std::string dir = test::make_temp_dir("cli_empty_");
    const CliResult r = run_cli({"generate",
                                 "--model",
                                 data("tiny-wuerstchen-combined"),
                                 "--prompt",
                                 "",
                                 "--prior-guidance",
                                 "1",
                                 "--decoder-guidance",
                                 "4",
                                 "--height",
                                 "128",
                                 "--width",
                                 "128",
                                 "--prior-steps",
                                 "2",
                                 "--decoder-steps",
                                 "2",
                                 "--device",
                                 "cpu",
                                 "--seed",
                                 "1",
                                 "--output",
                                 dir + "/e.png",
                                 "--quiet"});
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_TRUE(test::file_exists(dir + "/e.png"));
    test::remove_tree(dir);
}

TEST(CLI, HelpForEachCommand) {
    for (const char* cmd : {"generate", "prior", "decode", "tokenize", "info"}) {
        const CliResult r = run_cli({cmd, "--help"});
        EXPECT_EQ(r.status, 0) << cmd;
        EXPECT_NE(r.out.find("usage: wuerstchen " + std::string(cmd)), std::string::npos) << r.out;
    }
}

// `bench` prints one JSON object whose stage timings are positive and add up to the total.
void expect_bench_json(const CliResult& r, const std::vector<int64_t>& image_shape) {
    ASSERT_EQ(r.status, 0) << r.err;
    nlohmann::json j;
    ASSERT_NO_THROW(j = nlohmann::json::parse(r.out)) << r.out;
    EXPECT_EQ(j.at("device"), "cpu");
    EXPECT_EQ(j.at("device_type"), "cpu");
    EXPECT_EQ(j.at("dtype"), "fp32");
    EXPECT_EQ(j.at("batch"), 1);
    EXPECT_EQ(j.at("runs"), 1);
    EXPECT_FALSE(j.at("libtorch").get<std::string>().empty());
    EXPECT_TRUE(j.at("peak_cuda_memory_bytes").is_null());
    EXPECT_TRUE(j.at("peak_cuda_memory_gib").is_null());
    // On the CPU the peak comes from counting libtorch's CPU allocator, from before the models
    // are built: every stage's peak holds the fp32 weights, the denoising loops hold
    // activations on top, and the run's peak is the largest stage peak.
    const auto& peak = j.at("peak_memory");
    EXPECT_EQ(peak.at("allocator"), "cpu");
    const int64_t weights = 4 * j.at("parameters").at("total").get<int64_t>();
    int64_t largest = 0;
    for (const char* stage : {"text_encoding", "prior_loop", "decoder_loop", "vq_decode"}) {
        const auto bytes = peak.at("stages_bytes").at(stage).get<int64_t>();
        EXPECT_GE(bytes, weights) << stage;
        largest = std::max(largest, bytes);
    }
    EXPECT_GT(peak.at("stages_bytes").at("decoder_loop").get<int64_t>(), weights);
    EXPECT_GT(peak.at("stages_bytes").at("vq_decode").get<int64_t>(), weights);
    EXPECT_EQ(peak.at("bytes").get<int64_t>(), largest);
    EXPECT_EQ(j.at("images_shape").get<std::vector<int64_t>>(), image_shape);
    double sum = 0;
    for (const char* stage : {"text_encoding", "prior_loop", "decoder_loop", "vq_decode"}) {
        const auto& s = j.at("stages").at(stage);
        EXPECT_GT(s.at("median_s").get<double>(), 0) << stage;
        EXPECT_GT(s.at("min_s").get<double>(), 0) << stage;
        EXPECT_LE(s.at("min_s").get<double>(), s.at("median_s").get<double>()) << stage;
        EXPECT_EQ(s.at("runs").size(), 1u) << stage;
        sum += s.at("median_s").get<double>();
    }
    // One run: the total clock spans exactly the four stage clocks (each rounded to 1 us).
    EXPECT_NEAR(j.at("total").at("median_s").get<double>(), sum, 1e-5);
    int64_t params = 0;
    for (const char* part : {"prior_text_encoder", "prior", "decoder_text_encoder", "decoder", "vqgan"}) {
        EXPECT_GT(j.at("parameters").at(part).get<int64_t>(), 0) << part;
        params += j.at("parameters").at(part).get<int64_t>();
    }
    EXPECT_EQ(j.at("parameters").at("total").get<int64_t>(), params);
}

TEST(CLI, BenchTinyCpuPrintsJson) {
    const std::vector<std::string> common = {"--device", "cpu", "--height", "128", "--width", "128",
                                             "--prior-steps", "2", "--decoder-steps", "2",
                                             "--runs", "1", "--warmup", "0", "--quiet"};
    auto with = [&](std::vector<std::string> head) {
        head.insert(head.end(), common.begin(), common.end());
        return head;
    };
    // Built-in tiny configs with seeded random weights and the built-in byte-level tokenizer.
    const CliResult random = run_cli(with({"bench", "--random-weights", "--tiny"}));
    expect_bench_json(random, {1, 3, 128, 128});
    if (!HasFailure()) {
        const auto j = nlohmann::json::parse(random.out);
        EXPECT_EQ(j.at("weights"), "random-tiny");
        EXPECT_EQ(j.at("resolution"), "128x128");
        EXPECT_EQ(j.at("prior_steps"), 2);
        EXPECT_EQ(j.at("cudnn_benchmark"), false);
        EXPECT_EQ(j.at("image_embeddings_shape").get<std::vector<int64_t>>(),
                  (std::vector<int64_t>{1, 16, 3, 3}));
    }
    // The peak restarts with each stage: after a warm-up and over two runs, the text encoding's
    // peak stays below the decoder loop's (it would include the warm-up's peaks otherwise).
    const CliResult twice = run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu",
                                     "--height", "128", "--width", "128", "--prior-steps", "2",
                                     "--decoder-steps", "2", "--runs", "2", "--warmup", "1",
                                     "--quiet"});
    ASSERT_EQ(twice.status, 0) << twice.err;
    {
        const auto stages = nlohmann::json::parse(twice.out).at("peak_memory").at("stages_bytes");
        EXPECT_LT(stages.at("text_encoding").get<int64_t>(),
                  stages.at("decoder_loop").get<int64_t>());
    }
    // --threads sets libtorch's pool; without it (and without OMP_NUM_THREADS / MKL_NUM_THREADS)
    // the physical cores the process may run on: at least one, at most its CPUs.
    const CliResult one = run_cli(with({"bench", "--random-weights", "--tiny", "--threads", "1"}));
    expect_bench_json(one, {1, 3, 128, 128});
    if (!HasFailure()) EXPECT_EQ(nlohmann::json::parse(one.out).at("cpu_threads"), 1);
    // The text's keys and values once per call: the CPU's default, off when asked.
    const CliResult per_step =
        run_cli(with({"bench", "--random-weights", "--tiny", "--project-text-kv", "off"}));
    expect_bench_json(per_step, {1, 3, 128, 128});
    if (!HasFailure()) {
        EXPECT_EQ(nlohmann::json::parse(per_step.out).at("project_text_kv"), false);
        EXPECT_EQ(nlohmann::json::parse(random.out).at("project_text_kv"), true);
    }
    cpu_set_t cores;
    if (std::getenv("OMP_NUM_THREADS") == nullptr && std::getenv("MKL_NUM_THREADS") == nullptr &&
        sched_getaffinity(0, sizeof(cores), &cores) == 0 && !HasFailure()) {
        const int threads = nlohmann::json::parse(random.out).at("cpu_threads");
        EXPECT_GE(threads, 1);
        EXPECT_LE(threads, CPU_COUNT(&cores));
    }
    // ... with a tokenizer folder, and a model folder (the loading path).
    expect_bench_json(run_cli(with({"bench", "--random-weights", "--tiny", "--tokenizer",
                                    data("tiny-wuerstchen/tokenizer")})),
                      {1, 3, 128, 128});
    expect_bench_json(run_cli(with({"bench", "--model", data("tiny-wuerstchen-combined")})),
                      {1, 3, 128, 128});
}

TEST(CLI, BenchUsageErrors) {
    expect_one_line_error(run_cli({"bench", "--device", "cpu"}), {"--random-weights", "--model"});
    expect_one_line_error(run_cli({"bench", "--model", data("tiny-wuerstchen-combined"), "--tiny"}),
                          {"--tiny goes with --random-weights"});
    expect_one_line_error(run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu", "--runs", "0"}),
                          {"--runs must be at least 1"});
    expect_one_line_error(
        run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu", "--threads", "0"}),
        {"--threads must be between 1 and"});
    expect_one_line_error(
        run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu", "--threads", "100000"}),
        {"--threads must be between 1 and", "100000"});
    expect_one_line_error(run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu", "--offload"}),
                          {"--offload needs --device cuda"});
    expect_one_line_error(
        run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu", "--sequential-offload"}),
        {"--sequential-offload needs --device cuda"});
    // The default build has no profiler (the wuerstchen_profile target of a CUDA build has).
    expect_one_line_error(run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu",
                                   "--profile", "trace.json"}),
                          {"--profile needs the wuerstchen_profile build"});
    expect_one_line_error(
        run_cli({"generate", "--model", data("tiny-wuerstchen-combined"), "--prompt", "x",
                 "--device", "cpu", "--cuda-graphs"}),
        {"--cuda-graphs needs --device cuda"});
    expect_one_line_error(
        run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu", "--cudnn-benchmark"}),
        {"--cudnn-benchmark needs --device cuda"});
    expect_one_line_error(run_cli({"bench", "--random-weights", "--tiny", "--device", "cpu",
                                   "--project-text-kv", "maybe"}),
                          {"--project-text-kv must be 'on' or 'off'", "maybe"});
    const CliResult help = run_cli({"bench", "--help"});
    EXPECT_EQ(help.status, 0);
    EXPECT_NE(help.out.find("usage: wuerstchen bench"), std::string::npos) << help.out;
}

}  // namespace
}  // namespace wuerstchen
