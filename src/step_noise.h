#pragma once

// The random draws of a pipeline call, made ahead on a worker thread.
//
// A call draws its initial latents and then, in DDPMWuerstchenScheduler::step, one
// standard-normal tensor of the latents' shape per step, all from the call's CPU generator
// (diffusers' randn_tensor). None of them depends on the model's outputs, so they can be drawn
// while the device computes: in fp16 libtorch 1.13's CPU sampler takes about 6 ms for the
// latents of one 1024x1024 image (25 ms for four) on a 2-core VM, which drawn inline would add to
// every decoder step on the host. StepNoise draws a fixed plan in order, on a worker when
// `ahead`; the generator sees the same draws in the same order as inline, as long as nothing
// else draws from it meanwhile (the pipelines draw inline when a step callback, which could, is
// set). The worker starts at the first request and keeps up to `ahead_bytes` of draws ready (the
// combined pipeline's plan covers both stages, so the decoder's draws are made while the prior
// runs). Draws made but never taken (a call that stops early, e.g. on an exception) are undone
// when the StepNoise goes: the generator is set back to its state before the first of them, so
// it ends where drawing inline would have left it.

#include <ATen/core/Generator.h>
#include <torch/types.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace wuerstchen {

// One draw of a plan: torch.randn(shape, dtype) on the generator, delivered on `device` (drawn
// into page-locked memory and copied asynchronously for CUDA).
struct NoiseDraw {
    std::vector<int64_t> shape;
    torch::ScalarType dtype;
    torch::Device device;
};

class StepNoise {
public:
    using Draw = NoiseDraw;

    StepNoise(at::Generator generator, std::vector<Draw> plan, bool ahead,
              int64_t ahead_bytes = kAheadBytes);
    // Stops the worker after the draw in progress, joins it, and undoes the draws not taken.
    ~StepNoise();
    StepNoise(const StepNoise&) = delete;
    StepNoise& operator=(const StepNoise&) = delete;

    // The next draw of the plan, on its device. `shape`, when given, must be the planned one
    // (std::logic_error otherwise: the caller's plan is out of step with its use). Rethrows an
    // exception of the worker's draw; std::out_of_range after the last draw.
    torch::Tensor next(c10::optional<at::IntArrayRef> shape = c10::nullopt);

    // Draws still to come.
    int64_t remaining() const { return static_cast<int64_t>(plan_.size()) - taken_; }

    // Draws kept ready at most: at least one, then while under this many bytes.
    static constexpr int64_t kAheadBytes = int64_t{64} << 20;

private:
    torch::Tensor draw(const Draw& d) const;  // on the CPU (page-locked for CUDA)
    void work(size_t first);  // the worker: draws plan_[first...] in order

    at::Generator generator_;
    std::vector<Draw> plan_;
    bool ahead_;
    int64_t ahead_bytes_;
    int64_t taken_ = 0;

    std::mutex mutex_;
    std::condition_variable changed_;
    struct Ready {
        torch::Tensor values;
        torch::Tensor state_before;  // the generator's state before this draw
    };
    std::deque<Ready> ready_;
    int64_t ready_bytes_ = 0;
    std::exception_ptr error_;
    bool stop_ = false;
    std::thread worker_;
};

}  // namespace wuerstchen
