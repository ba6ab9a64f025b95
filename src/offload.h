#pragma once

// Where a model sits while a pipeline stage runs (LoadOptions::offload / sequential_offload).
//
// SequentialOffload is the block-at-a-time mode: the model's offload units (its blocks) keep
// their weights on their home device (the CPU, pinned for CUDA) and each unit gets a copy on the
// compute device only around its own forward. On CUDA the copy of the next unit is issued on a
// side stream while the current unit computes; the compute stream waits for it with an event;
// a released copy is marked used by the compute stream (record_stream) so the caching allocator
// does not hand its memory out before the kernels reading it are done. The host waits for the
// unit two places back to finish before issuing the next copy, so at most three units hold
// device memory at once. Everything of the model outside its units (embeddings, mappers, the
// output head) stays on the device for the offloader's lifetime.

#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "wuerstchen/block_hook.h"
#include "wuerstchen/pipeline_common.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {

enum class OffloadMode { none, model, sequential };

// The mode LoadOptions asks for on its device: none on the CPU. Throws InvalidArgument naming
// `where` when both offload flags are set.
OffloadMode offload_mode(const char* where, const LoadOptions& options);

// Pins the module's CPU parameters and buffers (page-locked memory, for asynchronous copies);
// no-op without CUDA.
void pin_module(torch::nn::Module& module);

class SequentialOffload final : public BlockHook {
public:
    // units: the model's offload units in execution order. copy_on_same_device makes the copies
    // even when `device` is the weights' home device (tests exercise the bookkeeping on the CPU).
    SequentialOffload(torch::nn::Module& model, std::vector<torch::nn::Module*> units,
                      torch::Device device, bool copy_on_same_device = false);
    // Every parameter and buffer back on its home tensor (also after an exception mid-forward).
    ~SequentialOffload() override;
    SequentialOffload(const SequentialOffload&) = delete;
    SequentialOffload& operator=(const SequentialOffload&) = delete;

    void before(const torch::nn::Module& unit) override;
    void after(const torch::nn::Module& unit) override;

    // For tests: how many units held a device copy at most at one time, and how many copies
    // of units were made.
    int max_units_on_device() const { return max_loaded_; }
    int64_t unit_copies() const { return copies_; }

private:
    struct Slot {
        torch::Tensor param;  // the registered tensor, whose data is swapped
        torch::Tensor home;   // the weights on their home device
        bool pinned = false;  // home is page-locked: its copies can be asynchronous
    };
    struct Unit {
        std::vector<Slot> slots;
        bool loaded = false;
        std::optional<c10::Event> ready;  // copies done (side stream)
        std::optional<c10::Event> done;   // forward done (compute stream)
    };

    void load(size_t i);
    void release(size_t i);
    void wait_done(size_t i) const;

    torch::Device device_;
    bool copy_ = false;     // the device differs from home, or copy_on_same_device
    bool streams_ = false;  // CUDA: side-stream copies and events
    std::optional<c10::Stream> side_;
    std::vector<Unit> units_;
    std::unordered_map<const torch::nn::Module*, size_t> index_;
    std::optional<OffloadGuard> resident_;  // the model outside its units, for the lifetime
    int loaded_ = 0;
    int max_loaded_ = 0;
    int64_t copies_ = 0;
};

// One stage of a pipeline call: the model on `device` per `mode` for the scope's lifetime, then
// back where it was. Units and hook slot come from models that support sequential offload; for
// others (or without units) sequential offload moves the whole model, like model offload.
class StageScope {
public:
    StageScope(torch::nn::Module& model, torch::Device device, OffloadMode mode,
               BlockHook** hook_slot = nullptr, std::vector<torch::nn::Module*> units = {});
    ~StageScope();
    StageScope(const StageScope&) = delete;
    StageScope& operator=(const StageScope&) = delete;

private:
    std::optional<OffloadGuard> whole_;  // the whole model moved (model offload)
    std::unique_ptr<SequentialOffload> sequential_;
    BlockHook** hook_slot_ = nullptr;
};

// StageScope for a model holder with offload_units() and a block_hook member.
template <typename Holder>
StageScope stage_scope(Holder& model, torch::Device device, OffloadMode mode) {
    return StageScope(*model, device, mode, &model->block_hook, model->offload_units());
}

}  // namespace wuerstchen
