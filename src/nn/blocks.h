#pragma once

// Building blocks shared by stage C (WuerstchenPrior) and stage B (WuerstchenDiffNeXt), ported
// from diffusers' modeling_wuerstchen_common.py. Child names are the diffusers attribute names,
// with Sequential indices kept, so named_parameters() equals the checkpoint's key set.
// Every Linear is a LoRA-capable wuerstchen::LoraLinearImpl (see wuerstchen/lora.h): the members
// stay torch::nn::Linear, the forwards go through lora_forward().

#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "nn/linear_group.h"
#include "wuerstchen/lora.h"
#include "wuerstchen/mapped_timesteps.h"

namespace wuerstchen::nn {

// LayerNorm over channels of an NCHW tensor, no affine parameters (WuerstchenLayerNorm).
// Float32 statistics for half / bfloat16 input (CUDA's kernel accumulates in float32; on the CPU the
// input is widened).
torch::Tensor layer_norm_2d(const torch::Tensor& x, double eps = 1e-6);
// LayerNorm over the last dimension without affine parameters (nn.LayerNorm(affine=False)).
torch::Tensor layer_norm_last(const torch::Tensor& x, double eps = 1e-6);

// nn.ReplicationPad2d(pad) on NCHW; in float32 for half / bfloat16 on the CPU, where libtorch
// 1.13 has no reduced-precision kernel (exact: padding only copies values).
torch::Tensor replication_pad_2d(const torch::Tensor& x, int64_t pad);

// The size of each part when `total` rows go in equal parts of at most `max_part` rows (at
// least 1): as few parts as fit, all of that size but the last, which is shorter by less than
// the number of parts (no one-row remainder). 0 for total 0.
int64_t balanced_part(int64_t total, int64_t max_part);

// nn.GELU() (erf form).
torch::Tensor gelu(const torch::Tensor& x);

// x * (1 + a) + b with [a, b] = mapper(t).  Keys: mapper.{weight,bias}
struct TimestepBlockImpl : torch::nn::Module {
    TimestepBlockImpl(int64_t c, int64_t c_timestep);
    // x: [B, C, H, W], t: [B, c_timestep] -> [B, C, H, W]
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& t);
    // The same with t already mapped: ab = mapper(t), [B, 2C] (any strides).
    torch::Tensor modulate(const torch::Tensor& x, const torch::Tensor& ab);
    // The same with 1 already added to a: [1 + a, b], [B, 2C] (add_one_to_scales).
    torch::Tensor modulate_scaled(const torch::Tensor& x, const torch::Tensor& factors);
    torch::nn::Linear mapper{nullptr};
};
TORCH_MODULE(TimestepBlock);

// ConvNeXt-V2 GRN over NHWC input.  Keys: gamma, beta ([1, 1, 1, dim])
struct GlobalResponseNormImpl : torch::nn::Module {
    explicit GlobalResponseNormImpl(int64_t dim);
    // x: [B, H, W, C] -> [B, H, W, C]
    torch::Tensor forward(const torch::Tensor& x);
    torch::Tensor gamma, beta;
};
TORCH_MODULE(GlobalResponseNorm);

// Linear(c, 4c) -> GELU -> GRN(4c) -> Dropout -> Linear(4c, c) as a Sequential with upstream
// indices (0, 2, 4).  Keys: channelwise.0.*, channelwise.2.{gamma,beta}, channelwise.4.*
struct ChannelwiseMLPImpl : torch::nn::Module {
    ChannelwiseMLPImpl(int64_t c_in, int64_t c_hidden, int64_t c_out);
    // x: [B, H, W, c_in] -> [B, H, W, c_out]
    torch::Tensor forward(const torch::Tensor& x);
    // The rest of forward after the first layer: its output [B, H, W, c_hidden] -> [B, H, W,
    // c_out].
    torch::Tensor forward_hidden(const torch::Tensor& hidden);
    // A residual block's end: forward_hidden(hidden) + x as [B, C, H, W] (x: [B, C, H, W]).
    // With bias_folded, fc2 adds no bias (ResidualBiases moved it into the next timestep
    // block's shift) and, where x is NHWC in memory and autograd is off, the product is summed
    // into x itself in the matrix product (no pass of its own): x is overwritten and returned.
    torch::Tensor add_to(const torch::Tensor& hidden, const torch::Tensor& x, bool bias_folded);
    torch::nn::Linear fc1{nullptr}, fc2{nullptr};
    GlobalResponseNorm grn{nullptr};
};
TORCH_MODULE(ChannelwiseMLP);

// Stage C's ResBlock: depthwise conv over [x ; x_skip], LayerNorm2d, channelwise MLP, residual.
// Keys: depthwise.{weight,bias}, channelwise.*
struct ResBlockImpl : torch::nn::Module {
    ResBlockImpl(int64_t c, int64_t c_skip = 0, int64_t kernel_size = 3);
    // x: [B, C, H, W], x_skip: [B, c_skip, H, W] or undefined -> [B, C, H, W]. bias_folded:
    // see ChannelwiseMLPImpl::add_to (x may then be overwritten).
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& x_skip = {},
                          bool bias_folded = false);
    torch::nn::Conv2d depthwise{nullptr};
    ChannelwiseMLP channelwise{nullptr};
};
TORCH_MODULE(ResBlock);

// diffusers Attention (AttnProcessor semantics): to_q / to_k / to_v with bias, to_out.0.
struct AttentionImpl : torch::nn::Module {
    AttentionImpl(int64_t query_dim, int64_t heads, int64_t dim_head);
    // x: [B, N, C], context: [B, M, C] -> [B, N, C]
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);
    // The same where context's first N rows are x (self-attention over [x ; more]). When
    // projections() is ready, q, k and v come from one product over context (q from its first
    // N rows), instead of three.
    torch::Tensor forward_self(const torch::Tensor& x, const torch::Tensor& context);
    // to_q, to_k, to_v as one group (pack_attention_projections packs it).
    LinearGroup projections() const;
    // context [B, M, C] -> its keys and values side by side, [B, M, 2 * heads*dim_head] (k then
    // v, contiguous), from the packed projections; undefined unless projections() is ready.
    torch::Tensor project_kv(const torch::Tensor& context) const;
    // Self-attention over [x ; more] where more's keys and values are given (project_kv's):
    // x [B, N, C], kv_more [B, M, 2 * heads*dim_head] -> [B, N, C], x's q, k and v in one
    // product. Throws InvalidArgument unless projections() is ready: kv_more came from the
    // packed product, and a LoRA adapter contributing (or autograd) since would apply to x's
    // rows only.
    torch::Tensor forward_self_projected(const torch::Tensor& x, const torch::Tensor& kv_more);
    int64_t heads;
    int64_t dim_head;
    torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
    torch::nn::Sequential to_out{nullptr};  // {0: Linear}

private:
    // softmax(q k^T / sqrt(dim_head)) v, then to_out: q [B, heads, N, dim_head], k and v
    // [B, heads, M, dim_head] -> [B, N, heads * dim_head].
    torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);
};
TORCH_MODULE(Attention);

// Self-attention over [norm(x) ; kv_mapper(cond)].
// Keys: attention.*, kv_mapper.1.{weight,bias}
struct AttnBlockImpl : torch::nn::Module {
    AttnBlockImpl(int64_t c, int64_t c_cond, int64_t nhead, bool self_attn = true);
    // x: [B, C, H, W], cond: [B, M, c_cond] -> [B, C, H, W]
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cond);
    // The same with cond already mapped: kv = kv_mapper(cond), [B, M, C] (any strides), or for
    // self-attention its keys and values, attention->project_kv(kv_mapper(cond)), [B, M, 2C].
    torch::Tensor forward_mapped(const torch::Tensor& x, const torch::Tensor& kv);
    // kv_mapper's Linear (index 1, after the SiLU).
    torch::nn::LinearImpl& kv_linear();
    bool self_attn;
    Attention attention{nullptr};
    torch::nn::Sequential kv_mapper{nullptr};  // {0: SiLU, 1: Linear}
};
TORCH_MODULE(AttnBlock);

// The condition mappers among a model's blocks (given in execution order, e.g. its
// offload_units()): every AttnBlock's kv_mapper Linear, every TimestepBlock's mapper, in that
// order. Each kind reads one input for all its blocks (the text condition, the r-embedding).
LinearGroup kv_mappers(const std::vector<torch::nn::Module*>& blocks);
LinearGroup timestep_mappers(const std::vector<torch::nn::Module*>& blocks);
// A mapped condition's modules, named for messages, in the order a model lists them.
using NamedModules = std::vector<std::pair<std::string, torch::nn::Module*>>;
// What a mapped condition was computed from besides its inputs, as it was: each mapper module
// that map_condition ran (the model lists them), and, per attention block in execution order, its
// to_k and to_v weights and biases when its keys and values were projected ahead (else none).
struct ConditionSource {
    std::vector<ModuleSeen> mappers;
    bool mappers_tracked = false;  // false: some were inference tensors, not checked
    std::vector<std::vector<TensorSeen>> projected;
};
struct MappedKv {
    std::vector<torch::Tensor> kv;
    std::vector<std::vector<TensorSeen>> projected;  // per attention block; empty when none were
};
// Every AttnBlock's kv_mapper (SiLU, then Linear) of `cond`, [B, M, c_cond], in execution order
// and each contiguous (the attention's join is faster then), as one product when
// kv_mappers(blocks) is ready on cond's device; else empty, and each block maps its own. With
// project_kv, a self-attention block whose projections are ready gets its keys and
// values of that instead (AttentionImpl::project_kv, [B, M, 2C]), which
// AttnBlockImpl::forward_mapped takes while those projections stay ready and unchanged
// (check_condition_source). Not where the weights cannot be tracked (inference tensors).
MappedKv map_kv_packed(const std::vector<torch::nn::Module*>& blocks, const torch::Tensor& cond,
                       bool project_kv = false);
// Notes the source of a condition just mapped by `mappers`, with map_kv_packed's `projected`.
std::shared_ptr<const ConditionSource> note_condition_source(
    const NamedModules& mappers, std::vector<std::vector<TensorSeen>> projected);
// Throws InvalidArgument (naming `where` and the module) when a condition (its `kv`, for `blocks`
// in execution order, and its `source`) is not what `mappers` (listed as for
// note_condition_source) and the blocks would map now: a mapper's tensors replaced or changed in
// place, or its LoRA state changed, since; or keys and values projected ahead whose to_k / to_v
// were (or that have no source). A condition without a source (made by hand, from_tensors) is
// taken as it is, except for projected keys and values.
void check_condition_source(const std::vector<torch::Tensor>& kv, const ConditionSource* source,
                            const NamedModules& mappers,
                            const std::vector<torch::nn::Module*>& blocks,
                            const std::string& where);
// The named kv_mapper of each AttnBlock among the blocks, in order: for a model's NamedModules.
void add_kv_mappers(const std::vector<torch::nn::Module*>& blocks, NamedModules& out);
// Packs both kinds, and the ResidualBiases where they apply (the models'
// pack_condition_mappers); whether both kinds are packed.
bool pack_condition_mappers(const std::vector<torch::nn::Module*>& blocks);
// Packs each self-attention AttnBlock's to_q, to_k and to_v (AttentionImpl::projections) among
// the blocks (the models' pack_attention_projections); whether every one is packed (true when
// there are none).
bool pack_attention_projections(const std::vector<torch::nn::Module*>& blocks);
// Every residual block (a module with a ChannelwiseMLP child "channelwise") is followed by a
// timestep block in the prior and the decoder, which computes y (1 + a) + b of its output
// y = fc2(h) + c + x. So fc2's bias c can move into the shift: (y' + c)(1 + a) + b =
// y' (1 + a) + (b + c (1 + a)). The blocks' mapped [1 + a, b] get c (1 + a) added once per step
// (one op per run of equally wide blocks), and each residual block then sums its product
// straight into its input x in the matrix product, instead of writing it and adding x in a
// pass of its own (ChannelwiseMLPImpl::add_to).
class ResidualBiases {
public:
    // blocks in execution order (a model's offload_units()): the fc2 of the residual block just
    // before each timestep block, in timestep-block order; none at all unless every residual
    // block is followed by a timestep block and every timestep block follows a residual block.
    explicit ResidualBiases(const std::vector<torch::nn::Module*>& blocks);
    // Stores those biases back to back in one buffer (the parameters view their rows: same
    // names, shapes and values), unless already. Returns whether they are (false when some
    // timestep block follows no residual block, or the biases differ in dtype or device).
    bool pack();
    // fold_into may run for `timesteps` (timestep_mappers of the same blocks) and their
    // mapping `all`: the biases packed, on all's device and in its dtype, one per timestep
    // block and half its width; no unfused LoRA adapter contributing to an fc2; autograd off.
    bool ready(const LinearGroup& timesteps, const torch::Tensor& all) const;
    // all: [B, total_out] after add_one_to_scales -> each block's b += c (1 + a), in place.
    void fold_into(const LinearGroup& timesteps, torch::Tensor& all) const;

    // The fc2 layers, in timestep-block order (empty when the blocks do not pair up).
    const std::vector<torch::nn::LinearImpl*>& layers() const { return layers_; }

private:
    bool packed() const;
    std::vector<torch::nn::LinearImpl*> layers_;  // empty unless every timestep block has one
};

// Every timestep block's mapping of r_embed ([N, c_r]) in one product, when `group` =
// timestep_mappers(blocks) is ready on its device: rows = [N, group.total_out()] with 1 added to
// each scale (add_one_to_scales) and, where ResidualBiases(blocks) is ready, the residual blocks'
// last biases folded into the shifts (the residual blocks then run with residual_biases_folded).
// Else undefined rows, and each block maps its own.
MappedTimesteps map_timesteps_packed(const LinearGroup& group,
                                     const std::vector<torch::nn::Module*>& blocks,
                                     const torch::Tensor& r_embed);

// What map_timesteps' rows were mapped from: every timestep mapper's weight and bias and, when
// the residual biases were folded into the rows, every residual block's last bias, as they were.
struct TimestepSource {
    std::vector<TensorSeen> seen;
    bool residual_biases_folded = false;
};

// The models' map_timesteps: map_timesteps_packed with its source noted, so that rows can be
// checked against the weights when a forward reads them later. Undefined rows when the mappers
// are not ready, or when their tensors cannot be tracked (inference tensors, which have no
// version): the forward then maps r per step.
MappedTimesteps map_timesteps_ahead(const std::vector<torch::nn::Module*>& blocks,
                                    const torch::Tensor& r_embed);

// Whether `t` are rows that a forward over `blocks` (a model's offload_units()) with a batch of
// `batch` on `device` in `dtype` can read: defined, map_timesteps_ahead's for these blocks, [1 or
// batch, total] there, the mappers (and, when folded, the residual biases) still the tensors
// mapped, unchanged, and still ready (no LoRA adapter on them contributing, autograd off).
// InvalidArgument naming `where` otherwise.
void check_mapped_timesteps(const MappedTimesteps& t, const std::vector<torch::nn::Module*>& blocks,
                            int64_t batch, const torch::Device& device, torch::ScalarType dtype,
                            const char* where);

// `all` = timestep_mappers(...).forward(r_embed), [B, total_out()]: adds 1 to every layer's
// first half of columns (its a of [a, b]) in place, one op per run of equally wide layers
// instead of one per block; each layer's columns are then modulate_scaled's factors.
void add_one_to_scales(const LinearGroup& group, torch::Tensor& all);

// torch::nn::ConvTranspose2d (same parameters and keys) that computes in float32 for half /
// bfloat16 input on the CPU: libtorch 1.13 hands a bf16 transposed convolution on the CPU to
// oneDNN's plain convolution, which rejects the transposed weight layout.
struct CpuSafeConvTranspose2dImpl : torch::nn::ConvTranspose2dImpl {
    CpuSafeConvTranspose2dImpl(int64_t c_in, int64_t c_out, int64_t kernel_size, int64_t stride,
                               int64_t padding = 0);
    torch::Tensor forward(const torch::Tensor& x);
    int64_t stride_, padding_;
};
TORCH_MODULE(CpuSafeConvTranspose2d);

// Sinusoidal embedding of r in [0, 1] (gen_r_embedding), zero-padded when c_r is odd.
// Frequencies are computed in double and rounded once to float (see tests/data/README.md).
// r: [B] -> [B, c_r] in r's dtype.
torch::Tensor r_embedding(const torch::Tensor& r, int64_t c_r, double max_positions = 10000.0);

}  // namespace wuerstchen::nn
