#include "step_graphs.h"

#include <c10/core/InferenceMode.h>
#include <torch/version.h>

#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <utility>

#include "lora_state.h"
#include "module_walk.h"
#include "wuerstchen/error.h"
#include "wuerstchen/lora.h"

// Graph capture needs a CUDA build of a recent libtorch (capture modes and the allocator's
// endAllocateToPool / releasePool, as in 2.5 and later).
#if defined(WUERSTCHEN_WITH_CUDA) && \
    (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5))
#define WUERSTCHEN_CUDA_GRAPHS 1
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace wuerstchen {

#if defined(WUERSTCHEN_CUDA_GRAPHS)
namespace {

using PoolId = decltype(at::cuda::graph_pool_handle());  // a pair of ids in 1.13 and 2.x

std::string signature(const std::vector<torch::Tensor>& inputs, const std::string& key) {
    std::ostringstream os;
    os << key;
    for (const auto& t : inputs)
        os << '|' << t.sizes() << ':' << t.scalar_type() << '@' << t.device();
    return os.str();
}

// A stream of our own for captures (pooled streams are shared round-robin with other users).
class OwnedStream {
public:
    explicit OwnedStream(c10::DeviceIndex device) : device_(device) {
        const c10::cuda::CUDAGuard on(device);
        C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    }
    ~OwnedStream() {
        const c10::cuda::CUDAGuard on(device_);
        (void)cudaStreamDestroy(stream_);
    }
    OwnedStream(const OwnedStream&) = delete;
    OwnedStream& operator=(const OwnedStream&) = delete;
    c10::cuda::CUDAStream get() const { return c10::cuda::getStreamFromExternal(stream_, device_); }
    c10::DeviceIndex device() const { return device_; }

private:
    c10::DeviceIndex device_;
    cudaStream_t stream_ = nullptr;
};

// The capture stream of `device`, shared by every cache, with the lock that makes its captures
// one at a time. Created on first use and kept for the life of the process (never destroyed: no
// CUDA call at exit).
//
// Graphs captured on it by one thread share that thread's cuBLAS workspace for the stream, so
// two of them must not replay at the same time on different streams: each replay (with the copies
// into its input buffers and out of its output buffer) waits for the previous one (`replayed`,
// recorded after it), which costs nothing when the calls are on one stream anyway.
struct CaptureStream {
    std::mutex mutex;
    std::unique_ptr<OwnedStream> stream;
    at::cuda::CUDAEvent replayed;
};

CaptureStream& capture_stream(c10::DeviceIndex device) {
    static std::mutex streams_mutex;
    static auto* streams = new std::map<c10::DeviceIndex, CaptureStream>();
    const std::lock_guard<std::mutex> lock(streams_mutex);
    return (*streams)[device];  // map nodes stay put as others are added
}

}  // namespace
#endif

struct StepGraphs::Impl {
    struct Entry {
        std::vector<torch::Tensor> inputs;  // the graph's input buffers
        torch::Tensor output;               // the graph's output buffer
        // For each constant input, the tensor last copied into its buffer. Weak: kept from
        // dying would keep a finished call's tensors alive; a weak reference also keeps the
        // object's address from being reused while it is held.
        std::vector<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> copied;
#if defined(WUERSTCHEN_CUDA_GRAPHS)
        std::unique_ptr<at::cuda::CUDAGraph> graph;
        cudaStream_t home = nullptr;  // the stream the input buffers were allocated on
#endif
    };
#if defined(WUERSTCHEN_CUDA_GRAPHS)
    // One memory pool for the graphs of this cache (they never run concurrently).
    std::optional<PoolId> pool;
#endif
    std::map<std::string, Entry> entries;
    std::string fingerprint;
    bool failed = false;  // a capture failed: run eagerly from then on
    // Copies of a pipeline share the cache: one capture / replay at a time (a replay writes the
    // graph's input buffers).
    mutable std::mutex mutex;

    void clear() {
        entries.clear();
#if defined(WUERSTCHEN_CUDA_GRAPHS)
        pool.reset();  // a released pool id is not reused: the next capture takes a new one
#endif
    }
};

StepGraphs::StepGraphs() : impl_(std::make_unique<Impl>()) {}
StepGraphs::~StepGraphs() = default;

bool StepGraphs::supported() {
#if defined(WUERSTCHEN_CUDA_GRAPHS)
    return true;
#else
    return false;
#endif
}

void StepGraphs::clear() {
    const std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->clear();
}

size_t StepGraphs::size() const {
    const std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->entries.size();
}

void StepGraphs::invalidate_unless(const std::string& fingerprint) {
    const std::lock_guard<std::mutex> lock(impl_->mutex);
    if (fingerprint == impl_->fingerprint) return;
    impl_->clear();
    impl_->fingerprint = fingerprint;
}

std::optional<std::string> StepGraphs::prepare_call(const LoadOptions& options, OffloadMode mode,
                                                    torch::Device device, torch::nn::Module& model,
                                                    bool cfg, double guidance_scale) {
    if (!options.cuda_graphs || mode != OffloadMode::none || !device.is_cuda()) return std::nullopt;
    // Adapters move to the weights' device on first use: before the fingerprint, so that the
    // first graphed call does not change it.
    place_lora_adapters({&model});
    invalidate_unless(weights_fingerprint(model));
    return guidance_key(cfg, guidance_scale);
}

#if defined(WUERSTCHEN_CUDA_GRAPHS)
namespace {

// How far a capture got before an exception.
enum class CaptureStage { beginning, capturing, ending };

// Leaves a capture that failed at `stage` with an exception: ends the stream capture and the
// allocator's routing into the pool, so the process stays usable, and hands the pool's
// reference back exactly once. Never throws.
//
// Who releases the pool differs across libtorch versions. Where capture_end succeeds on a step
// that threw (a partial graph), the graph owns the reference and its destructor releases it:
// `graph` is destroyed as usual. Otherwise (capture_begin or capture_end threw) it depends on
// how far the version's CUDAGraph got and on what its reset() releases: older 2.x releases only
// an ended capture, recent versions (those with allocated_pool_ in CUDAGraph.cpp) any acquired
// pool. Nothing public tells, and releasing twice trips the allocator's use-count assertion
// (fatal in a destructor), so on that path the graph object is deliberately leaked (a few
// hundred bytes, at most once per StepGraphs: a failed capture turns graphs off) and the
// reference is released here. capture_end is never called twice: its bookkeeping
// (markCaptureEnd) is not idempotent in recent versions. Assumed: a capture_begin that throws
// has taken the pool already (its only throwing call after the pool, cudaStreamBeginCapture,
// comes after beginAllocateToPool in every version read). Recent versions also route pinned
// host allocations of the capture to a pool that this path leaves (the graph is leaked, so
// nothing dangles; the capture made no host allocations).
void abandon_capture(std::unique_ptr<at::cuda::CUDAGraph>& graph, CaptureStage stage,
                     const OwnedStream& stream, PoolId pool) {
    if (stage == CaptureStage::capturing) {
        try {
            graph->capture_end();  // ends the capture and the routing; throws on a broken one
            graph.reset();
            return;
        } catch (...) {
        }
    }
    (void)graph.release();  // deliberately leaked: see above
    cudaGraph_t partial = nullptr;
    if (cudaStreamEndCapture(stream.get().stream(), &partial) == cudaSuccess && partial != nullptr)
        (void)cudaGraphDestroy(partial);
    (void)cudaGetLastError();
    try {
        c10::cuda::CUDACachingAllocator::endAllocateToPool(stream.device(), pool);
    } catch (...) {  // capture_end may have ended the routing before it failed
    }
    try {
        c10::cuda::CUDACachingAllocator::releasePool(stream.device(), pool);
    } catch (...) {
    }
}

}  // namespace
#endif

torch::Tensor StepGraphs::run(const std::vector<torch::Tensor>& inputs, const std::string& key,
                              const Step& step, size_t constants) {
    TORCH_CHECK(constants <= inputs.size(), "StepGraphs::run: ", constants, " constants among ",
                inputs.size(), " inputs");
#if defined(WUERSTCHEN_CUDA_GRAPHS)
    if (inputs.empty() || !inputs[0].is_cuda()) return step(inputs);
    const std::lock_guard<std::mutex> lock(impl_->mutex);
    if (impl_->failed) return step(inputs);
    // The graph's buffers are inference tensors: keep every use inside InferenceMode.
    const c10::InferenceMode inference;
    const torch::Device device = inputs[0].device();
    const c10::cuda::CUDAGuard device_guard(device);
    const std::string sig = signature(inputs, key);
    auto found = impl_->entries.find(sig);
    if (found == impl_->entries.end()) {
        CaptureStream& capture = capture_stream(device.index());
        const std::lock_guard<std::mutex> one_capture_at_a_time(capture.mutex);
        if (!capture.stream) capture.stream = std::make_unique<OwnedStream>(device.index());
        const OwnedStream& stream = *capture.stream;
        if (!impl_->pool) impl_->pool = at::cuda::graph_pool_handle();
        Impl::Entry entry;
        entry.home = c10::cuda::getCurrentCUDAStream(device.index()).stream();
        for (const auto& t : inputs) entry.inputs.push_back(t.clone());
        for (size_t i = inputs.size() - constants; i < inputs.size(); ++i)
            entry.copied.emplace_back(inputs[i].getIntrusivePtr());
        // As torch.cuda.graph: synchronise (orders the capture stream after all work so far),
        // one eager warm-up on the capture stream (lazy cuBLAS / cuDNN set-up stays outside the
        // capture), then the capture. The warm-up's cached blocks are released before it.
        c10::cuda::device_synchronize();
        {
            const c10::cuda::CUDAStreamGuard on_capture_stream(stream.get());
            step(entry.inputs);
            c10::cuda::device_synchronize();
            c10::cuda::CUDACachingAllocator::emptyCache();
            entry.graph = std::make_unique<at::cuda::CUDAGraph>();
            CaptureStage stage = CaptureStage::beginning;
            try {
                // Thread-local mode: other threads' CUDA calls do not invalidate this capture.
                entry.graph->capture_begin(*impl_->pool, cudaStreamCaptureModeThreadLocal);
                stage = CaptureStage::capturing;
                entry.output = step(entry.inputs);
                stage = CaptureStage::ending;
                entry.graph->capture_end();
            } catch (...) {
                abandon_capture(entry.graph, stage, stream, *impl_->pool);
                impl_->clear();
                impl_->failed = true;
                throw;
            }
        }
        c10::cuda::device_synchronize();
        found = impl_->entries.emplace(sig, std::move(entry)).first;
    }
    Impl::Entry& e = found->second;
    TORCH_CHECK(e.copied.size() == constants, "StepGraphs::run: ", constants,
                " constant inputs for a graph captured with ", e.copied.size());
    CaptureStream& capture = capture_stream(device.index());
    const std::lock_guard<std::mutex> one_replay_at_a_time(capture.mutex);
    const auto current = c10::cuda::getCurrentCUDAStream(device.index());
    // After the previous replay of any graph on this capture stream, also one on another stream:
    // its input copies, replay and output clone may still be running there.
    capture.replayed.block(current);
    // Replayed from another stream than the buffers' own, the allocator must not hand them out
    // again (once the entry is dropped) before this stream's use of them has run.
    if (current.stream() != e.home)
        for (const auto& t : e.inputs) t.record_stream(current);
    const size_t first_constant = inputs.size() - constants;
    for (size_t i = 0; i < first_constant; ++i) e.inputs[i].copy_(inputs[i]);
    for (size_t i = first_constant; i < inputs.size(); ++i) {
        auto& copied = e.copied[i - first_constant];
        if (copied.lock().get() == inputs[i].unsafeGetTensorImpl()) continue;
        e.inputs[i].copy_(inputs[i]);
        copied = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
            inputs[i].getIntrusivePtr());
    }
    e.graph->replay();
    auto output = e.output.clone();
    capture.replayed.record(current);
    return output;
#else
    (void)key;
    return step(inputs);
#endif
}

std::string guidance_key(bool cfg, double guidance_scale) {
    if (!cfg) return "no guidance";
    std::ostringstream os;
    os << "guidance " << std::hexfloat << guidance_scale;
    return os.str();
}

CallbackWeightsWatch::CallbackWeightsWatch(const torch::nn::Module& model, bool enabled,
                                           std::function<void()> mapped_hold)
    : model_(model),
      enabled_(enabled),
      mapped_hold_(std::move(mapped_hold)),
      at_start_(enabled ? weights_fingerprint(model) : "") {}

void CallbackWeightsWatch::check(const std::string& where, const std::string& model,
                                 int step) const {
    if (!enabled_) return;
    const std::string after = ": the step callback after step " + std::to_string(step);
    if (weights_fingerprint(model_) != at_start_)
        throw InvalidArgument(where + after + " replaced the " + model +
                              "'s weights or changed its LoRA state; a call maps its condition "
                              "once, so change them between calls");
    if (!mapped_hold_) return;
    try {
        mapped_hold_();
    } catch (const InvalidArgument& e) {
        throw InvalidArgument(where + after + " changed the " + model +
                              "'s weights in place, which the call mapped once; change them "
                              "between calls (" +
                              e.what() + ")");
    }
}

std::string weights_fingerprint(const torch::nn::Module& module) {
    // Per module, in visiting order: its parameters and buffers, then its LoRA state, as raw
    // bytes (a pipeline call makes one before its first kernel: formatting them as text took
    // as long again).
    std::string out;
    auto put_tensor = [](std::string& to, const torch::Tensor& t) {
        append_bytes(to, t.defined() ? t.data_ptr() : nullptr);
        if (!t.defined()) return;
        append_bytes(to, static_cast<int16_t>(t.scalar_type()));
        append_bytes(to, static_cast<int16_t>(t.device().type()));
        append_bytes(to, static_cast<int16_t>(t.device().index()));
    };
    visit_modules(module, [&](const torch::nn::Module& m) {
        for (const auto& t : m.parameters(/*recurse=*/false)) put_tensor(out, t);
        out += ';';
        for (const auto& t : m.buffers(/*recurse=*/false)) put_tensor(out, t);
        out += ';';
        if (const auto* lora = dynamic_cast<const LoraLinearImpl*>(&m))
            append_lora_state(out, *lora, put_tensor);
        return false;
    });
    return out;
}

}  // namespace wuerstchen
