#pragma once

// The per-step noise of a denoising loop, drawn ahead on a worker thread.
//
// DDPMWuerstchenScheduler::step draws one standard-normal tensor of the latents' shape per step
// from the call's CPU generator (diffusers' randn_tensor), also at the last step. The draws do
// not depend on the model's outputs, so they can be made while the device computes: in fp16
// libtorch 1.13's CPU sampler takes about 6 ms for the latents of one 1024x1024 image (25 ms for
// four) on a 2-core VM, which inline would add to every decoder step on the host. The generator
// sees the same draws in the same order as inline, as long as nothing else draws from it while
// the loop runs (the pipelines draw inline when a step callback, which could, is set).

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

class StepNoise {
public:
    // `count` draws of `shape` in `dtype` (torch.randn on the CPU generator), each delivered on
    // `device` (drawn into page-locked memory and copied asynchronously for CUDA). ahead: a
    // worker thread keeps up to kDepth draws ready; otherwise each is drawn when asked for.
    StepNoise(at::Generator generator, std::vector<int64_t> shape, torch::ScalarType dtype,
              torch::Device device, int64_t count, bool ahead);
    // Stops the worker after the draw in progress and joins it.
    ~StepNoise();
    StepNoise(const StepNoise&) = delete;
    StepNoise& operator=(const StepNoise&) = delete;

    // The next draw, on the device. Rethrows an exception of the worker's draw; throws
    // std::out_of_range after `count` draws.
    torch::Tensor next();

    static constexpr size_t kDepth = 2;

private:
    torch::Tensor draw() const;  // one draw on the CPU (pinned for CUDA)
    void work();

    at::Generator generator_;
    std::vector<int64_t> shape_;
    torch::ScalarType dtype_;
    torch::Device device_;
    int64_t count_;
    int64_t taken_ = 0;

    std::mutex mutex_;
    std::condition_variable changed_;
    std::deque<torch::Tensor> ready_;
    std::exception_ptr error_;
    bool stop_ = false;
    std::thread worker_;  // last: started when everything above is set
};

}  // namespace wuerstchen
