#include "memory.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#if defined(WUERSTCHEN_WITH_CUDA)
#include <ATen/Functions.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>

namespace wuerstchen::cli {

namespace {

std::atomic<bool> g_tracking{false};
std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

// What the wrapper handed out and still lives: its size and the wrapped allocator's deleter.
struct Live {
    int64_t bytes;
    c10::DeleterFnPtr free;
};
// Both never destroyed: deleters may run during static destruction.
std::mutex& live_mutex() {
    static auto* mutex = new std::mutex();
    return *mutex;
}
std::unordered_map<void*, Live>& live() {
    static auto* table = new std::unordered_map<void*, Live>();
    return *table;
}
// The allocator wrapped, for the raw frees of what it handed out uncounted.
std::atomic<c10::Allocator*> g_inner{nullptr};

// Wraps the CPU allocator. Its DataPtrs keep data == context (libtorch's raw_allocate users
// require it): sizes and the wrapped deleters are looked up by address.
class CountingCpuAllocator final : public c10::Allocator {
public:
    explicit CountingCpuAllocator(c10::Allocator* inner) : inner_(inner) {}

    // Allocator::allocate is const up to libtorch 2.2 and non-const from 2.3 on: defining both
    // overrides the one the headers declare (the other is a plain member), in either version.
    c10::DataPtr allocate(size_t n) const { return counted(n); }
    c10::DataPtr allocate(size_t n) { return counted(n); }
    // Pure virtual from libtorch 2.3 on (Allocator::clone); a plain member before.
    void copy_data(void* dest, const void* src, size_t count) const {
        if (count != 0) std::memcpy(dest, src, count);
    }
    // Overrides in every version (no `override`, like the members above: clang warns on a mix).
    c10::DeleterFnPtr raw_deleter() const { return &release; }

private:
    static void release(void* data) {
        Live entry{0, nullptr};
        {
            const std::lock_guard<std::mutex> lock(live_mutex());
            const auto it = live().find(data);
            if (it != live().end()) {
                entry = it->second;
                live().erase(it);
            }
        }
        if (entry.free == nullptr) {  // handed out uncounted: the wrapped allocator's raw free
            c10::Allocator* inner = g_inner.load();
            entry.free = inner != nullptr ? inner->raw_deleter() : nullptr;
        }
        g_current.fetch_sub(entry.bytes, std::memory_order_relaxed);
        if (entry.free != nullptr && data != nullptr) entry.free(data);
    }

    c10::DataPtr counted(size_t n) const {
        c10::DataPtr inner = inner_->allocate(n);
        void* data = inner.get();
        const c10::Device device = inner.device();
        const c10::DeleterFnPtr free = inner.get_deleter();
        if (data == nullptr) return inner;  // zero bytes: nothing to count
        if (inner.get_context() != data || free == nullptr)
            return inner;  // not a plain allocation: left to its own deleter, uncounted
        (void)inner.release_context();
        const auto bytes = static_cast<int64_t>(n);
        {
            const std::lock_guard<std::mutex> lock(live_mutex());
            live()[data] = Live{bytes, free};
        }
        const int64_t now = g_current.fetch_add(bytes, std::memory_order_relaxed) + bytes;
        int64_t peak = g_peak.load(std::memory_order_relaxed);
        while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
        }
        return c10::DataPtr(data, data, &release, device);
    }

    c10::Allocator* inner_;
};

#if defined(WUERSTCHEN_WITH_CUDA)
// The device whose caching-allocator statistics are read. libtorch sizes the allocator's
// per-device tables when it initialises CUDA, which its first CUDA allocation does; before that
// the statistics calls fail ("Invalid device argument"), as they did with --offload, where
// nothing is on the GPU before the first run. So one byte is allocated (and freed) first.
c10::DeviceIndex cuda_index(torch::Device device) {
    static std::once_flag initialised;
    std::call_once(initialised, [device] {
        (void)at::empty({1}, at::TensorOptions().device(device).dtype(at::kByte));
    });
    return device.has_index() ? device.index() : c10::cuda::current_device();
}
#endif

}  // namespace

void track_cpu_memory() {
    static std::once_flag once;
    std::call_once(once, [] {
        // Never deleted: libtorch keeps using it for the rest of the process.
        c10::Allocator* inner = c10::GetCPUAllocator();
        g_inner = inner;
        auto* counting = new CountingCpuAllocator(inner);
        c10::SetCPUAllocator(counting, /*priority=*/std::numeric_limits<uint8_t>::max());
        g_tracking = true;
    });
}

void reset_peak_memory(torch::Device device) {
#if defined(WUERSTCHEN_WITH_CUDA)
    if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(cuda_index(device));
#endif
    if (device.is_cpu()) g_peak = g_current.load();
}

PeakMemory peak_memory(torch::Device device) {
    PeakMemory out;
#if defined(WUERSTCHEN_WITH_CUDA)
    if (device.is_cuda()) {
        const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(cuda_index(device));
        // Index 0 is StatType::AGGREGATE (all pools).
        out.allocated = stats.allocated_bytes[0].peak;
        out.reserved = stats.reserved_bytes[0].peak;
    }
#endif
    if (device.is_cpu() && g_tracking) out.allocated = g_peak.load();
    return out;
}

}  // namespace wuerstchen::cli
