#include "offload.h"

#include <c10/core/InferenceMode.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/cuda.h>

#include <thread>
#include <unordered_set>
#include <utility>

#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"

namespace wuerstchen {

OffloadMode offload_mode(const char* where, const LoadOptions& options) {
    if (options.offload && options.sequential_offload)
        throw InvalidArgument(std::string(where) +
                              ": `offload` and `sequential_offload` are both set: pass one of them");
    if (options.device.is_cpu()) return OffloadMode::none;
    if (options.sequential_offload) return OffloadMode::sequential;
    return options.offload ? OffloadMode::model : OffloadMode::none;
}

void pin_module(torch::nn::Module& module) {
    if (!torch::cuda::is_available()) return;
    c10::InferenceMode not_inference(/*enabled=*/false);
    torch::NoGradGuard no_grad;
    for (auto& t : module_tensors(module))
        if (t.is_cpu() && !t.is_pinned()) t.set_data(t.pin_memory());
}

SequentialOffload::SequentialOffload(torch::nn::Module& model,
                                     std::vector<torch::nn::Module*> units, torch::Device device,
                                     bool copy_on_same_device)
    : device_(device) {
    // Parameters are swapped with set_data, which must not receive inference tensors.
    c10::InferenceMode not_inference(/*enabled=*/false);
    torch::NoGradGuard no_grad;
    std::unordered_set<const c10::TensorImpl*> in_units;
    units_.resize(units.size());
    for (size_t i = 0; i < units.size(); ++i) {
        index_.emplace(units[i], i);
        for (auto& t : module_tensors(*units[i])) {
            in_units.insert(t.unsafeGetTensorImpl());
            units_[i].slots.push_back({t, t.detach(), false});
            copy_ = copy_ || t.device() != device_;
        }
    }
    std::vector<torch::Tensor> resident;
    for (auto& t : module_tensors(model)) {
        if (in_units.count(t.unsafeGetTensorImpl()) != 0) continue;
        copy_ = copy_ || t.device() != device_;
        resident.push_back(t);
    }
    copy_ = copy_ || copy_on_same_device;
    streams_ = copy_ && device_.is_cuda();
    if (streams_) {
        for (auto& u : units_)
            for (auto& s : u.slots) s.pinned = s.home.is_pinned();  // asked once, not per step
        c10::impl::VirtualGuardImpl impl(device_.type());
        side_ = impl.getStreamFromGlobalPool(device_);
        for (auto& u : units_) {
            u.ready.emplace(device_.type());
            u.done.emplace(device_.type());
        }
    }
    if (copy_) resident_.emplace(resident, device_, /*copy_all=*/copy_on_same_device);
}

SequentialOffload::~SequentialOffload() {
    try {
        c10::InferenceMode not_inference(/*enabled=*/false);
        for (size_t i = 0; i < units_.size(); ++i)
            if (units_[i].loaded) release(i);
    } catch (...) {  // a destructor must not throw; the weights stay where they are
    }
}

void SequentialOffload::load(size_t i) {
    Unit& u = units_[i];
    if (u.loaded) return;
    c10::InferenceMode not_inference(/*enabled=*/false);
    torch::NoGradGuard no_grad;
    if (copy_) {
        std::optional<c10::StreamGuard> on_side;
        if (streams_) on_side.emplace(*side_);
        size_t copied = 0;
        try {
            for (; copied < u.slots.size(); ++copied) {
                auto& s = u.slots[copied];
                s.param.set_data(s.home.to(device_, /*non_blocking=*/s.pinned, /*copy=*/true));
            }
        } catch (...) {  // e.g. out of memory: the unit goes back home whole
            for (size_t k = 0; k < copied; ++k) u.slots[k].param.set_data(u.slots[k].home);
            throw;
        }
        if (streams_) u.ready->record(*side_);
        ++copies_;
    }
    u.loaded = true;
    max_loaded_ = std::max(max_loaded_, ++loaded_);
}

void SequentialOffload::release(size_t i) {
    Unit& u = units_[i];
    if (!u.loaded) return;
    if (copy_) {
        c10::InferenceMode not_inference(/*enabled=*/false);
        for (auto& s : u.slots) {
            // The copy was allocated on the side stream and read on the compute stream.
            if (streams_)
                s.param.record_stream(
                    c10::impl::VirtualGuardImpl(device_.type()).getStream(device_));
            s.param.set_data(s.home);
        }
    }
    u.loaded = false;
    --loaded_;
}

void SequentialOffload::wait_done(size_t i) const {
    if (!streams_) return;
    const c10::Event& done = *units_[i].done;
    while (!done.query()) std::this_thread::yield();
}

void SequentialOffload::before(const torch::nn::Module& unit) {
    const auto it = index_.find(&unit);
    if (it == index_.end()) return;  // not one of ours: runs wherever its weights are
    const size_t i = it->second;
    load(i);
    if (streams_) {
        const c10::Stream compute =
            c10::impl::VirtualGuardImpl(device_.type()).getStream(device_);
        units_[i].ready->block(compute);
    }
    // Prefetch the next unit (the first one after the last: the next denoising step), once the
    // unit two places back is done, so that at most three units hold device memory.
    const size_t n = units_.size();
    const size_t next = (i + 1) % n;
    if (next != i && !units_[next].loaded) {
        // With fewer than three units, the one about to be loaded is the one to wait for.
        wait_done(n >= 3 ? (i + n - 2) % n : next);
        load(next);
    }
}

void SequentialOffload::after(const torch::nn::Module& unit) {
    const auto it = index_.find(&unit);
    if (it == index_.end()) return;
    const size_t i = it->second;
    if (streams_)
        units_[i].done->record(c10::impl::VirtualGuardImpl(device_.type()).getStream(device_));
    release(i);
}

// ---------------------------------------------------------------------------- StageScope

StageScope::StageScope(torch::nn::Module& model, torch::Device device, OffloadMode mode,
                       BlockHook** hook_slot, std::vector<torch::nn::Module*> units) {
    if (mode == OffloadMode::none) return;
    if (mode == OffloadMode::sequential && hook_slot != nullptr && !units.empty()) {
        pin_module(model);  // weights replaced since loading (a fused LoRA) are pinned again
        sequential_ = std::make_unique<SequentialOffload>(model, std::move(units), device);
        hook_slot_ = hook_slot;
        *hook_slot_ = sequential_.get();
        return;
    }
    whole_.emplace(model, device, /*enabled=*/true);
}

StageScope::~StageScope() {
    if (hook_slot_ != nullptr) *hook_slot_ = nullptr;
}

}  // namespace wuerstchen
