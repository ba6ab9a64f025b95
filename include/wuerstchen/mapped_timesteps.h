#pragma once

// The timestep blocks' modulations of the prior and the decoder, mapped ahead of the denoising
// steps (WuerstchenPriorImpl::map_timesteps, WuerstchenDiffNeXtImpl::map_timesteps).

#include <torch/types.h>

#include <cstdint>

namespace wuerstchen {

// Every timestep block's modulation for a set of noise ratios: row i holds, for r[i], each
// block's mapper output (its columns in the order of the model's timestep blocks, [a, b] per
// block) with 1 added to each scale a. That is what a forward computes from r at every step, so
// a pipeline maps all of a call's ratios at once and hands step i its row. Valid while the
// model's weights stay as they were when mapped.
struct MappedTimesteps {
    torch::Tensor rows;  // [N, total] in the model's dtype; undefined: mapped per step instead
    // The residual blocks' last biases are in the shifts b (each residual block then adds no
    // bias of its own): true when the model's forward would fold them itself.
    bool residual_biases_folded = false;

    bool defined() const { return rows.defined(); }
    // Row i as [1, total], for a batch whose samples are all at ratio r[i]. Throws
    // InvalidArgument when there is no such row.
    MappedTimesteps row(int64_t i) const;
};

}  // namespace wuerstchen
