#include "step_noise.h"

#include <stdexcept>
#include <string>
#include <utility>

namespace wuerstchen {

StepNoise::StepNoise(at::Generator generator, std::vector<int64_t> shape, torch::ScalarType dtype,
                     torch::Device device, int64_t count, bool ahead)
    : generator_(std::move(generator)),
      shape_(std::move(shape)),
      dtype_(dtype),
      device_(device),
      count_(count) {
    if (ahead && count_ > 0) worker_ = std::thread([this] { work(); });
}

StepNoise::~StepNoise() {
    {
        const std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    changed_.notify_all();
    if (worker_.joinable()) worker_.join();
}

torch::Tensor StepNoise::draw() const {
    // torch.randn is empty(...).normal_(0, 1, generator): the same values in page-locked memory.
    auto options = torch::TensorOptions().dtype(dtype_);
    if (device_.is_cuda()) options = options.pinned_memory(true);
    return at::empty(shape_, options).normal_(0, 1, generator_);
}

void StepNoise::work() {
    for (int64_t i = 0; i < count_; ++i) {
        {
            std::unique_lock<std::mutex> lock(mutex_);
            changed_.wait(lock, [this] { return stop_ || ready_.size() < kDepth; });
            if (stop_) return;
        }
        torch::Tensor t;
        try {
            t = draw();
        } catch (...) {
            const std::lock_guard<std::mutex> lock(mutex_);
            error_ = std::current_exception();
            changed_.notify_all();
            return;
        }
        {
            const std::lock_guard<std::mutex> lock(mutex_);
            ready_.push_back(std::move(t));
        }
        changed_.notify_all();
    }
}

torch::Tensor StepNoise::next() {
    if (taken_ >= count_)
        throw std::out_of_range("StepNoise: all " + std::to_string(count_) + " draws taken");
    torch::Tensor t;
    if (!worker_.joinable()) {
        t = draw();
    } else {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [this] { return !ready_.empty() || error_; });
        if (ready_.empty()) std::rethrow_exception(error_);
        t = std::move(ready_.front());
        ready_.pop_front();
        lock.unlock();
        changed_.notify_all();
    }
    ++taken_;
    // From page-locked memory the copy is queued and the host goes on (see randn_like_diffusers).
    return t.to(device_, /*non_blocking=*/device_.is_cuda());
}

}  // namespace wuerstchen
