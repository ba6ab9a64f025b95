#include "step_graphs.h"

#include <map>
#include <optional>
#include <sstream>
#include <utility>

#include "wuerstchen/lora.h"

#if defined(WUERSTCHEN_WITH_CUDA)
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace wuerstchen {

#if defined(WUERSTCHEN_WITH_CUDA)
namespace {

std::string signature(const std::vector<torch::Tensor>& inputs, const std::string& key) {
    std::ostringstream os;
    os << key;
    for (const auto& t : inputs)
        os << '|' << t.sizes() << ':' << t.scalar_type() << '@' << t.device();
    return os.str();
}

}  // namespace
#endif

struct StepGraphs::Impl {
    struct Entry {
        std::vector<torch::Tensor> inputs;  // the graph's input buffers
        torch::Tensor output;               // the graph's output buffer
#if defined(WUERSTCHEN_WITH_CUDA)
        std::unique_ptr<at::cuda::CUDAGraph> graph;
#endif
    };
    std::map<std::string, Entry> entries;
    std::string fingerprint;
#if defined(WUERSTCHEN_WITH_CUDA)
    using PoolId = decltype(std::declval<at::cuda::CUDAGraph&>().pool());
    std::optional<PoolId> pool;  // shared by the graphs of this cache
#endif
};

StepGraphs::StepGraphs() : impl_(std::make_unique<Impl>()) {}
StepGraphs::~StepGraphs() = default;

bool StepGraphs::supported() {
#if defined(WUERSTCHEN_WITH_CUDA)
    return true;
#else
    return false;
#endif
}

void StepGraphs::clear() {
    impl_->entries.clear();
#if defined(WUERSTCHEN_WITH_CUDA)
    impl_->pool.reset();
#endif
}

size_t StepGraphs::size() const { return impl_->entries.size(); }

void StepGraphs::invalidate_unless(const std::string& fingerprint) {
    if (fingerprint == impl_->fingerprint) return;
    clear();
    impl_->fingerprint = fingerprint;
}

torch::Tensor StepGraphs::run(const std::vector<torch::Tensor>& inputs, const std::string& key,
                              const Step& step) {
#if defined(WUERSTCHEN_WITH_CUDA)
    if (inputs.empty() || !inputs[0].is_cuda()) return step(inputs);
    const torch::Device device = inputs[0].device();
    const c10::cuda::CUDAGuard device_guard(device);
    const std::string sig = signature(inputs, key);
    auto found = impl_->entries.find(sig);
    if (found == impl_->entries.end()) {
        Impl::Entry entry;
        for (const auto& t : inputs) entry.inputs.push_back(t.clone());
        // Capture must happen on a side stream; the device synchronisation before it (as
        // torch.cuda.graph does) orders the side stream after everything issued so far.
        c10::cuda::device_synchronize();
        {
            const c10::cuda::CUDAStreamGuard on_side(
                c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()));
            for (int warm_up = 0; warm_up < 2; ++warm_up) step(entry.inputs);
            c10::cuda::device_synchronize();
            entry.graph = std::make_unique<at::cuda::CUDAGraph>();
            if (impl_->pool)
                entry.graph->capture_begin(*impl_->pool);
            else
                entry.graph->capture_begin();
            entry.output = step(entry.inputs);
            entry.graph->capture_end();
            if (!impl_->pool) impl_->pool = entry.graph->pool();
        }
        c10::cuda::device_synchronize();
        found = impl_->entries.emplace(sig, std::move(entry)).first;
    }
    Impl::Entry& e = found->second;
    for (size_t i = 0; i < inputs.size(); ++i) e.inputs[i].copy_(inputs[i]);
    e.graph->replay();
    return e.output.clone();
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

std::string weights_fingerprint(const torch::nn::Module& module) {
    std::ostringstream os;
    for (const auto& t : module.parameters())
        os << t.data_ptr() << t.scalar_type() << t.device() << ';';
    for (const auto& t : module.buffers())
        os << t.data_ptr() << t.scalar_type() << t.device() << ';';
    for (const auto& m : module.modules(/*include_self=*/true)) {
        const auto* lora = dynamic_cast<const LoraLinearImpl*>(m.get());
        if (lora == nullptr || (lora->adapters().empty() && !lora->fused())) continue;
        os << 'L' << lora->lora_enabled() << lora->fused();
        for (const auto& a : lora->adapters())
            os << a.down.data_ptr() << a.up.data_ptr() << a.weight << a.alpha << a.rslora
               << a.active << a.merged << ',';
    }
    return os.str();
}

}  // namespace wuerstchen
