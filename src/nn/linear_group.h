#pragma once

// Linear layers of different blocks that read the same input, run as one matrix product.
//
// Each attention block of the prior and the decoder maps the same text condition with its own
// kv_mapper, and each timestep block maps the same r-embedding with its own mapper: per step,
// 32 to 52 small matrix products (and as many SiLUs) whose launches cost more GPU time than
// their arithmetic. pack() moves such layers' weights into one buffer, back to back, and their
// biases into another; each layer's parameters then view their rows of it (same names, shapes
// and values; no extra memory), and forward() is one product over the whole buffer, whose
// columns [offset(i), offset(i) + out(i)) are layer i's output.
//
// The layers stay ordinary modules: anything that replaces a parameter's tensor (a move to
// another device or dtype, a LoRA fuse, sequential offload's swaps) unpacks it, and ready() then
// says no, so the caller maps per layer as before. A group holds no tensors of its own.

#include <c10/util/intrusive_ptr.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace wuerstchen::nn {

// Whether layer's forward would add an unmerged LoRA branch (LoraLinearImpl::forward's test).
bool lora_contributes(const torch::nn::LinearImpl& layer);

// Whether each layer's `member` (its weight or its bias) lies in one buffer right after the
// previous layer's, in order: each contiguous, one dtype.
bool rows_back_to_back(const std::vector<torch::nn::LinearImpl*>& layers,
                       torch::Tensor torch::nn::LinearImpl::*member);
// Unless they already are, moves them into one new buffer so, with the same values (each
// parameter views its rows). The caller checks that they are defined, of one dtype and device,
// and alike after their first dimension.
void put_rows_back_to_back(const std::vector<torch::nn::LinearImpl*>& layers,
                           torch::Tensor torch::nn::LinearImpl::*member);

// A view of t's buffer from t's first element on, with these sizes and strides, outside
// autograd (e.g. the rows of several packed layers at once). Unlike as_strided it also works on
// parameters made in c10::InferenceMode, whose views autograd refuses to track.
torch::Tensor buffer_view(const torch::Tensor& t, c10::IntArrayRef sizes, c10::IntArrayRef strides);

class LinearGroup {
public:
    // The layers in output order. They must outlive the group (groups are made per call).
    explicit LinearGroup(std::vector<torch::nn::LinearImpl*> layers);

    // Packs the layers unless packed() already holds (weights and biases each: only the ones not
    // laid out move); returns packed(). Does nothing (and returns false) when they cannot be
    // packed: no layers, differing input sizes, dtypes or devices, or a layer without bias; or
    // when a LoRA is fused into some of them but not all: the fused ones keep their original
    // weights (rows of the old buffer) for the unfuse, so packing would hold the others twice.
    bool pack();

    // The layers' weights and biases are the rows of one buffer each, in order (pack()'s
    // layout), on `device`.
    bool packed(const torch::Device& device) const;

    // forward() may run for input on `device`: packed(device), no unmerged LoRA adapter
    // contributes, and no gradient is wanted for the weights.
    bool ready(const torch::Device& device) const;

    // x: [..., in] -> [..., total_out()]. Only when ready(x.device()).
    torch::Tensor forward(const torch::Tensor& x) const;
    // Layer i's output within forward()'s: its columns of `all` (a view).
    torch::Tensor columns(const torch::Tensor& all, size_t i) const;
    // Every layer's output within forward()'s, each contiguous ([..., out_features(i)]), made
    // with one copy per run of equally wide layers. A strided column view sends a later
    // torch::cat that takes it to libtorch's generic CUDA kernel (9.6 us for the prior's
    // attention join on an H100) instead of its vectorized one.
    std::vector<torch::Tensor> split(const torch::Tensor& all) const;

    // Runs of consecutive layers of equal out_features, in order: {first layer, count}. Their
    // outputs sit back to back in forward()'s, so a run's columns view as [..., count, width].
    std::vector<std::pair<size_t, size_t>> equal_width_runs() const;

    size_t size() const { return layers_.size(); }
    const torch::nn::LinearImpl& layer(size_t i) const { return *layers_[i]; }
    int64_t offset(size_t i) const { return offsets_[i]; }
    int64_t out_features(size_t i) const { return offsets_[i + 1] - offsets_[i]; }
    int64_t total_out() const { return offsets_.back(); }

private:
    bool packable() const;  // one input size, dtype and device; every layer has a bias
    bool partly_fused() const;  // a LoRA fused into some layers (LoraLinearImpl::fused) only

    std::vector<torch::nn::LinearImpl*> layers_;
    std::vector<int64_t> offsets_;  // size() + 1 entries: each layer's first output column
};

// A tensor as something computed from it saw it, to tell later whether that still holds: its
// buffer (a weak reference: it keeps no memory alive, but the StorageImpl's address from being
// reused for another buffer), data and version. A replaced tensor has another buffer; one changed
// in place (through itself or a view) a later version. Inference tensors have no version: they
// are never seen (tracked() is false and nothing matches).
class TensorSeen {
public:
    explicit TensorSeen(const torch::Tensor& t = {});
    bool tracked() const { return tracked_; }
    bool matches(const torch::Tensor& t) const;
    // The buffer's StorageImpl while it exists, else null.
    c10::intrusive_ptr<c10::StorageImpl> storage() const { return storage_.lock(); }

private:
    bool tracked_ = false;
    c10::weak_intrusive_ptr<c10::StorageImpl> storage_{c10::intrusive_ptr<c10::StorageImpl>()};
    const void* data_ = nullptr;
    uint32_t version_ = 0;
};

// A module (with its children) as something computed by running it saw it: each parameter and
// buffer (TensorSeen) and its LoRA state (per LoraLinear layer: enabled, fused, and each adapter's
// tensors, scales and switches; an adapter tensor changed in place counts where it has a version).
// matches() tells whether running it now would still compute the same: false once a tensor was
// replaced or changed in place, or an adapter was added, removed, switched, rescaled or fused.
class ModuleSeen {
public:
    // Places the LoRA adapters on their layers' devices first (as a forward that uses them does),
    // so that a later placement does not count as a change.
    explicit ModuleSeen(torch::nn::Module& module);
    // Every tensor could be noted (none is an inference tensor).
    bool tracked() const { return tracked_; }
    bool matches(const torch::nn::Module& module) const;

private:
    std::vector<TensorSeen> tensors_;  // per module: parameters, then buffers
    std::string lora_;                 // switches, names, scales and flags
    // The adapters' tensors (down, up per adapter), held: a condition keeps an unloaded adapter's
    // few weights alive, so that their addresses are not reused. Versions where they have one.
    std::vector<torch::Tensor> adapters_;
    std::vector<TensorSeen> adapters_seen_;
    bool tracked_ = true;
};

// A Linear layer whose last `mapped` input features are, for whole calls, an affine map
// M u + m of a narrower input u ([..., width]). The decoder's residual blocks read their level's
// image embeddings that way: a 1x1 convolution maps 16 channels to the 1024 that the block's
// first channelwise layer takes next to its own. Since W [a ; M u + m] + b equals
// [W_m M | W_a] [u ; a] + (b + W_m m), with W_m the weight's last `mapped` columns and W_a the
// others, the layer can read u instead: a product over width + in - mapped features, not in.
//
// fold() lays the weight out with `width` spare columns in front of it (the parameter views the
// rest of one buffer: same name, shape and values), writes W_m M into them and b + W_m m into
// the fold's own bias, and notes the version of each tensor it read. ready() holds while the
// layout and those versions do: a weight replaced (a move, a LoRA fuse) or changed in place
// since (through the tensor or a view of it) makes it say no, and the caller maps u itself
// until fold() runs again. The fold holds no reference to the weight's buffer, so a replaced
// weight's memory is freed as usual. Only fold() writes; ready() and forward() only read.
class InputFold {
public:
    // map_weight: [mapped, width] (M), map_bias: [mapped] (m), on the layer's device. Folds, or
    // does nothing (writes nothing) when already folded for these tensors and none changed
    // since, unless `again`: then the products are made anew from the current values (for
    // writes that no version counter sees, such as through Tensor::data() or a raw pointer).
    // Returns false (and changes nothing) for a layer without bias, differing devices or
    // dtypes, inference tensors, or shapes that do not fit.
    bool fold(torch::nn::LinearImpl& layer, const torch::Tensor& map_weight,
              const torch::Tensor& map_bias, bool again = false);
    // forward() may run for input on `device`: folded for these tensors, unchanged since, no
    // unmerged LoRA adapter contributes, and no gradient is wanted for the weights.
    bool ready(const torch::nn::LinearImpl& layer, const torch::Tensor& map_weight,
               const torch::Tensor& map_bias, const torch::Device& device) const;
    // x: [..., width + in - mapped] = [u, a] -> [..., out]. Only when ready().
    torch::Tensor forward(const torch::nn::LinearImpl& layer, const torch::Tensor& x) const;
    // The folded bias b + W_m m: one tensor, written in place by every fold() of one layout.
    const torch::Tensor& bias() const { return bias_; }

private:
    bool laid_out(const torch::nn::LinearImpl& layer) const;  // the weight views our buffer
    // Laid out and folded for these tensors, none of them changed since.
    bool current(const torch::nn::LinearImpl& layer, const torch::Tensor& map_weight,
                 const torch::Tensor& map_bias) const;
    // The weight's buffer as [out, width + in] (spare columns first). Only when laid_out().
    torch::Tensor whole(const torch::nn::LinearImpl& layer) const;

    int64_t width_ = 0, in_ = 0, mapped_ = 0;
    torch::Tensor bias_;  // [out]: b + W_m m
    // What fold() read, to tell whether it still holds. weight_'s buffer is the one fold() laid
    // the weight out in.
    TensorSeen weight_, bias_in_, map_weight_, map_bias_;
};

}  // namespace wuerstchen::nn
