#pragma once

// Peak memory for `wuerstchen bench`: on CUDA the caching allocator's statistics, on the CPU
// the bytes handed out by libtorch's CPU allocator, counted by a wrapper that
// track_cpu_memory() installs.

#include <torch/types.h>

#include <cstdint>

namespace wuerstchen::cli {

// Peak bytes since the last reset_peak_memory(): allocated (tensors alive at once) and, on CUDA,
// reserved by the caching allocator. -1 where not measured.
struct PeakMemory {
    int64_t allocated = -1;
    int64_t reserved = -1;
};

// Puts a counting wrapper in front of libtorch's CPU allocator, from here on, for this process
// (once; later calls do nothing). Only allocations made after it are counted. It leaves
// allocation to the allocator it wraps and adds two atomic updates per allocation.
void track_cpu_memory();

void reset_peak_memory(torch::Device device);

// CUDA: the device's caching-allocator peaks. CPU: the counted peak, when track_cpu_memory()
// ran. Otherwise both -1.
PeakMemory peak_memory(torch::Device device);

}  // namespace wuerstchen::cli
