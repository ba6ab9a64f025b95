#pragma once

// The timestep blocks' modulations of the prior and the decoder, mapped ahead of the denoising
// steps (WuerstchenPriorImpl::map_timesteps, WuerstchenDiffNeXtImpl::map_timesteps).

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <utility>

namespace wuerstchen {

namespace nn {
struct TimestepSource;
}  // namespace nn

// Every timestep block's modulation for a set of noise ratios: row i holds, for r[i], each
// block's mapper output (its columns in the order of the model's timestep blocks, [a, b] per
// block) with 1 added to each scale a. That is what a forward computes from r at every step, so
// a pipeline maps all of a call's ratios at once and hands step i its row. They hold while the
// weights they were mapped from stay as they were (the forward checks).
struct MappedTimesteps {
    torch::Tensor rows;  // [N, total] in the model's dtype; undefined: mapped per step instead
    // The residual blocks' last biases are in the shifts b (each residual block then adds no
    // bias of its own): true when the model's forward would fold them itself.
    bool residual_biases_folded = false;
    // What map_timesteps mapped the rows from (the mappers' weights and biases and, when
    // folded, the residual biases, as they were): the forward refuses rows without a source
    // and rows whose source has been replaced or changed since. It checks the source, not the
    // rows' values, which are the caller's (with_rows). Writes that no version counter sees
    // (through Tensor::data(), another tensor set_ onto a weight's memory, or a raw pointer)
    // need map_timesteps again.
    std::shared_ptr<const nn::TimestepSource> source;

    bool defined() const { return rows.defined(); }
    // Row i as [1, total], for a batch whose samples are all at ratio r[i]. Throws
    // InvalidArgument when there is no such row.
    MappedTimesteps row(int64_t i) const;
    // The same source and form with `other` rows in place of these: a copy of some of them
    // elsewhere (such as a CUDA graph's input buffer holding a row).
    MappedTimesteps with_rows(torch::Tensor other) const {
        return {std::move(other), residual_biases_folded, source};
    }
};

}  // namespace wuerstchen
