#include "step_noise.h"

#include <c10/util/Exception.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace wuerstchen {

StepNoise::StepNoise(at::Generator generator, std::vector<Draw> plan, bool ahead,
                     int64_t ahead_bytes)
    : generator_(std::move(generator)),
      plan_(std::move(plan)),
      ahead_(ahead),
      ahead_bytes_(ahead_bytes) {}

StepNoise::~StepNoise() {
    {
        const std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    changed_.notify_all();
    if (!worker_.joinable()) return;
    worker_.join();
    if (ready_.empty()) return;
    // Draws made ahead and never taken: back to the state before the first of them.
    try {
        const std::lock_guard<std::mutex> lock(generator_.mutex());
        generator_.set_state(ready_.front().state_before);
    } catch (...) {  // a destructor must not throw; the generator stays further on
    }
}

torch::Tensor StepNoise::draw(const Draw& d) const {
    // torch.randn is empty(...).normal_(0, 1, generator): the same values in page-locked memory.
    auto options = torch::TensorOptions().dtype(d.dtype);
    if (d.device.is_cuda()) options = options.pinned_memory(true);
    return at::empty(d.shape, options).normal_(0, 1, generator_);
}

void StepNoise::work(size_t first) {
    for (size_t i = first; i < plan_.size(); ++i) {
        {
            std::unique_lock<std::mutex> lock(mutex_);
            changed_.wait(lock,
                          [this] { return stop_ || ready_.empty() || ready_bytes_ < ahead_bytes_; });
            if (stop_) return;
        }
        Ready r;
        try {
            {
                const std::lock_guard<std::mutex> lock(generator_.mutex());
                r.state_before = generator_.get_state();
            }
            r.values = draw(plan_[i]);
        } catch (...) {
            const std::lock_guard<std::mutex> lock(mutex_);
            error_ = std::current_exception();
            changed_.notify_all();
            return;
        }
        {
            const std::lock_guard<std::mutex> lock(mutex_);
            ready_bytes_ += static_cast<int64_t>(r.values.nbytes());
            ready_.push_back(std::move(r));
        }
        changed_.notify_all();
    }
}

torch::Tensor StepNoise::next(c10::optional<at::IntArrayRef> shape) {
    if (taken_ >= static_cast<int64_t>(plan_.size()))
        throw std::out_of_range("StepNoise: all " + std::to_string(plan_.size()) +
                                " draws taken");
    const Draw& d = plan_[static_cast<size_t>(taken_)];
    if (shape.has_value() && *shape != at::IntArrayRef(d.shape))
        throw std::logic_error("StepNoise: draw " + std::to_string(taken_) + " was planned as " +
                               c10::str(at::IntArrayRef(d.shape)) + ", asked for " +
                               c10::str(*shape));
    torch::Tensor t;
    if (!ahead_) {
        t = draw(d);
    } else {
        if (!worker_.joinable()) {
            const auto first = static_cast<size_t>(taken_);
            worker_ = std::thread([this, first] { work(first); });
        }
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [this] { return !ready_.empty() || error_; });
        if (ready_.empty()) std::rethrow_exception(error_);
        t = std::move(ready_.front().values);
        ready_.pop_front();
        ready_bytes_ -= static_cast<int64_t>(t.nbytes());
        lock.unlock();
        changed_.notify_all();
    }
    ++taken_;
    // From page-locked memory the copy is queued and the host goes on (see randn_like_diffusers).
    return t.to(d.device, /*non_blocking=*/d.device.is_cuda());
}

}  // namespace wuerstchen
