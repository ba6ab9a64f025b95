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

#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace wuerstchen::nn {

class LinearGroup {
public:
    // The layers in output order. They must outlive the group (groups are made per call).
    explicit LinearGroup(std::vector<torch::nn::LinearImpl*> layers);

    // Packs the layers unless packed() already holds; returns packed(). Does nothing (and
    // returns false) when they cannot be packed: no layers, differing input sizes, dtypes or
    // devices, or a layer without bias.
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
    int64_t offset(size_t i) const { return offsets_[i]; }
    int64_t out_features(size_t i) const { return offsets_[i + 1] - offsets_[i]; }
    int64_t total_out() const { return offsets_.back(); }

private:
    bool packable() const;  // one input size, dtype and device; every layer has a bias

    std::vector<torch::nn::LinearImpl*> layers_;
    std::vector<int64_t> offsets_;  // size() + 1 entries: each layer's first output column
};

// A Linear layer whose last `mapped` input features are, for a whole call, an affine map
// M u + m of a narrower input u ([..., width]). The decoder's residual blocks read their level's
// image embeddings that way: a 1x1 convolution maps 16 channels to the 1024 that the block's
// first channelwise layer takes next to its own. Since W [a ; M u + m] + b equals
// [W_m M | W_a] [u ; a] + (b + W_m m), with W_m the weight's last `mapped` columns and W_a the
// others, the layer can read u instead: a product over width + in - mapped features, not in.
//
// prepare() lays the weight out with `width` spare columns in front of it (the parameter views
// the rest: same name, shape and values), set_map() writes W_m M into them and b + W_m m into
// the fold's own bias, and forward() is one product over [u, a]. set_map() reads the weights
// each time, so a call that maps first never sees a fold older than the weights. As with
// LinearGroup, anything that replaces the weight's tensor undoes the layout, and ready() then
// says no.
class InputFold {
public:
    // Lays out layer's weight as above, unless ready() already holds; returns whether it is laid
    // out. Does nothing (and returns false) for a layer without bias, or unless
    // 0 < mapped <= in and width > 0.
    bool prepare(torch::nn::LinearImpl& layer, int64_t width, int64_t mapped);
    // forward() may run for input on `device`: the weight is this fold's layout there, no
    // unmerged LoRA adapter contributes, and no gradient is wanted for the weights.
    bool ready(const torch::nn::LinearImpl& layer, const torch::Device& device) const;
    // map_weight: [mapped, width], map_bias: [mapped] (M and m). Only when ready().
    void set_map(const torch::nn::LinearImpl& layer, const torch::Tensor& map_weight,
                 const torch::Tensor& map_bias);
    // x: [..., width + in - mapped] = [u, a] -> [..., out]. Only after set_map().
    torch::Tensor forward(const torch::Tensor& x) const;

    int64_t width() const { return width_; }

private:
    bool laid_out(const torch::nn::LinearImpl& layer) const;  // layer's weight views storage_

    torch::Tensor storage_;  // [out, width + in]: the spare columns, then the weight
    torch::Tensor bias_;     // [out]: b + W_m m
    int64_t width_ = 0, mapped_ = 0;
    bool map_set_ = false;
};

}  // namespace wuerstchen::nn
