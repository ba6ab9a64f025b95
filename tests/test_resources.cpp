// Resource errors and concurrency: an allocation failure inside a pipeline call becomes an
// OutOfMemoryError that suggests remedies and leaves the pipeline usable (simulated with an
// address-space limit in a child process, as a real CUDA OOM is impossible here); two pipelines
// on two threads give the same results as run one after the other.

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"
#include "wuerstchen/combined_pipeline.h"
#include "wuerstchen/error.h"

namespace wuerstchen {
namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kUnderAsan = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kUnderAsan = true;
#else
constexpr bool kUnderAsan = false;
#endif
#else
constexpr bool kUnderAsan = false;
#endif

size_t current_vm_bytes() {
    long pages = 0, resident = 0;
    FILE* f = std::fopen("/proc/self/statm", "r");
    if (!f) return 0;
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) pages = 0;
    std::fclose(f);
    return static_cast<size_t>(pages) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// The child's part of OutOfMemoryIsTypedAndPipelineStaysUsable, run in a fresh process: the
// exit code says what happened (the parent's message lists them). Success is a code of its own,
// so a child that ran no test at all (exit 0) is not mistaken for one that passed.
constexpr int kChildPassed = 42;

[[noreturn]] void out_of_memory_child() {
    alarm(150);  // ends the child should the parent (which waits 120 s) be gone
    int code = 0;
    try {
        DecoderPipeline pipe = DecoderPipeline::from_pretrained(test::data_path("tiny-wuerstchen"));
        DecoderOptions small;
        small.image_embeddings = torch::randn({1, 16, 6, 6});
        small.num_inference_steps = 1;
        small.seed = 1;
        const torch::Tensor expected = pipe(small).images;  // also warms up lazy allocations

        // Cap the address space at what is mapped now plus 256 MiB. A 60x60 embedding asks the
        // decoder for 640x640 latents x 64 images: far more than that.
        struct rlimit limit;
        limit.rlim_cur = limit.rlim_max = current_vm_bytes() + (256u << 20);
        if (setrlimit(RLIMIT_AS, &limit) != 0) std::_Exit(10);
        DecoderOptions huge = small;
        huge.image_embeddings = torch::randn({1, 16, 60, 60});
        huge.num_images_per_prompt = 64;
        try {
            pipe(huge);
            code = 11;  // no error: the limit did not bite
        } catch (const OutOfMemoryError& e) {
            const std::string msg = e.what();
            if (msg.find("DecoderPipeline") == std::string::npos || msg.find("offload") == std::string::npos)
                code = 12;
        } catch (const std::exception& e) {
            std::fprintf(stderr, "child: unexpected %s\n", e.what());
            code = 13;  // some other error type
        } catch (...) {
            code = 13;
        }
        if (code == 0) {
            try {
                const torch::Tensor again = pipe(small).images;
                if (!torch::allclose(again, expected)) code = 14;
            } catch (...) {
                code = 15;  // not usable after the OOM
            }
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "child: setup failed: %s\n", e.what());
        code = 16;
    } catch (...) {
        code = 16;
    }
    std::fflush(nullptr);
    std::_Exit(code == 0 ? kChildPassed : code);
}

constexpr const char* kOomChildVariable = "WUERSTCHEN_TEST_OOM_CHILD";

// The limit is set in a freshly executed copy of this test binary rather than in a fork of the
// test process: a forked child inherits the parent's OpenMP pool without its threads, and
// libtorch 2.x's first parallel region in such a child waits for them forever.
TEST(Resources, OutOfMemoryIsTypedAndPipelineStaysUsable) {
    if (std::getenv(kOomChildVariable)) out_of_memory_child();
    if (kUnderAsan) GTEST_SKIP() << "an address-space limit cannot be combined with AddressSanitizer";

    // The environment minus gtest's sharding and output settings, under which the child could
    // run no test or overwrite the parent's report.
    std::vector<std::string> env_strings;
    for (char** e = environ; *e; ++e) {
        const std::string var = *e;
        if (var.rfind("GTEST_SHARD", 0) == 0 || var.rfind("GTEST_TOTAL_SHARDS", 0) == 0 ||
            var.rfind("GTEST_OUTPUT", 0) == 0)
            continue;
        env_strings.push_back(var);
    }
    env_strings.push_back(std::string(kOomChildVariable) + "=1");
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::string exe = "/proc/self/exe";
    std::string filter = "--gtest_filter=Resources.OutOfMemoryIsTypedAndPipelineStaysUsable";
    char* argv[] = {exe.data(), filter.data(), nullptr};
    pid_t child = 0;
    ASSERT_EQ(posix_spawn(&child, exe.c_str(), nullptr, nullptr, argv, envp.data()), 0);

    // Wait at most two minutes: a hang is a failure, not a stuck test run.
    int status = 0;
    pid_t done = 0;
    for (int i = 0; i < 1200 && done == 0; ++i) {
        done = waitpid(child, &status, WNOHANG);
        if (done == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (done == 0) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
        FAIL() << "the child did not finish within 120 s";
    }
    ASSERT_EQ(done, child);
    ASSERT_TRUE(WIFEXITED(status)) << "child crashed";
    EXPECT_EQ(WEXITSTATUS(status), kChildPassed)
        << "0: the child ran no test, 10: setrlimit failed, 11: no OOM, 12: message lacks "
           "where/remedy, 13: wrong error type, 14: different result afterwards, 15: pipeline "
           "unusable afterwards, 16: setup failed";
}

TEST(Resources, OutOfMemoryTranslation) {
    try {
        with_memory_errors("Where", []() -> int { throw std::bad_alloc(); });
        FAIL() << "no throw";
    } catch (const OutOfMemoryError& e) {
        EXPECT_NE(std::string(e.what()).find("Where: out of memory"), std::string::npos) << e.what();
    }
    // Other errors pass through untouched.
    EXPECT_THROW(with_memory_errors("Where", []() -> int { throw InvalidArgument("x"); }), InvalidArgument);
    EXPECT_THROW(with_memory_errors("Where", []() -> int { TORCH_CHECK(false, "shape mismatch"); }),
                 c10::Error);
}

CombinedOptions small_options(const std::string& prompt, uint64_t seed) {
    CombinedOptions o;
    o.prompts = {prompt};
    o.height = 256;
    o.width = 384;
    o.prior_num_inference_steps = 3;
    o.num_inference_steps = 2;
    o.seed = seed;
    return o;
}

TEST(Resources, TwoPipelinesOnTwoThreadsMatchSequential) {
    CombinedPipeline a = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-combined"));
    CombinedPipeline b = CombinedPipeline::from_pretrained(test::data_path("tiny-wuerstchen-prior"),
                                                           test::data_path("tiny-wuerstchen"));
    const CombinedOptions oa = small_options("Anthropomorphic cat dressed as a fire fighter", 42);
    const CombinedOptions ob = small_options("a lighthouse", 7);
    const torch::Tensor seq_a = a(oa).images;
    const torch::Tensor seq_b = b(ob).images;
    torch::Tensor par_a, par_b;
    for (int round = 0; round < 2; ++round) {
        std::thread ta([&] { par_a = a(oa).images; });
        std::thread tb([&] { par_b = b(ob).images; });
        ta.join();
        tb.join();
        EXPECT_TRUE(torch::equal(par_a, seq_a)) << "round " << round;
        EXPECT_TRUE(torch::equal(par_b, seq_b)) << "round " << round;
    }
    const SafeTensors ref = test::reference("pipeline_combined_seed42");
    EXPECT_TRUE(test::all_close("combined_seed42 from a thread", par_a, test::ref_tensor(ref, "images"), 1e-3));
}

}  // namespace
}  // namespace wuerstchen
