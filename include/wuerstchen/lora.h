#pragma once

// LoRA (low-rank adaptation) for the stage-C prior and its CLIP text encoder, read and applied the
// way diffusers (+ peft) does for WuerstchenPriorPipeline.load_lora_weights:
//
//   y = W x + b + sum over active adapters of  weight * (alpha / rank) * B (A x)
//
// with A = lora_A ("down", [rank, in]) and B = lora_B ("up", [out, rank]). `alpha` is the
// checkpoint's: a kohya `<module>.alpha` tensor, or diffusers' "lora_adapter_metadata"
// (lora_alpha / alpha_pattern, use_rslora: alpha / sqrt(rank)); absent -> alpha = rank, i.e.
// scaling 1 (what diffusers' training scripts rely on). `weight` is the load scale or the
// set_adapters weight.
//
// Every Linear layer of WuerstchenPrior (blocks' attention / kv_mapper / mapper / channelwise,
// cond_mapper) and of CLIPTextModel (self_attn.{q,k,v,out}_proj, mlp.fc1/fc2) is a LoraLinear:
// a torch::nn::Linear (same parameters, same state-dict keys) that can hold adapters. Adapter
// tensors are not registered parameters, so load_weights / named_parameters() are unchanged.
//
// Precision: adapter tensors are kept in the layer's weight dtype and the unfused LoRA branch
// runs in that dtype (as peft does); on a device change they follow the weight at the next
// forward. fuse() computes W + delta in fp32 and rounds once to the weight dtype; unfuse()
// restores the original weight tensor bit-exactly (it keeps it, where diffusers subtracts).

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace wuerstchen {

// One adapter on one layer.
struct LoraAdapter {
    std::string name;
    torch::Tensor down;   // lora_A.weight [rank, in_features], in the weight dtype
    torch::Tensor up;     // lora_B.weight [out_features, rank]
    double alpha = 1.0;   // peft's lora_alpha for this layer
    bool rslora = false;  // scaling alpha / sqrt(rank) instead of alpha / rank
    double weight = 1.0;  // load scale / set_adapters weight
    bool active = true;   // set_adapters: inactive adapters do not contribute
    bool merged = false;  // fused into the layer's weight

    int64_t rank() const { return down.size(0); }
    // alpha / rank (or alpha / sqrt(rank)), without `weight`.
    double base_scaling() const;
    double scaling() const { return weight * base_scaling(); }
};

// torch::nn::Linear that can hold LoRA adapters. Its forward hides LinearImpl::forward: call it
// through a LoraLinear / shared_ptr<LoraLinearImpl>, or lora_forward() for a torch::nn::Linear.
class LoraLinearImpl : public torch::nn::LinearImpl {
public:
    LoraLinearImpl(int64_t in_features, int64_t out_features);
    // Built unwritten while an UninitializedParameters guard is alive (see weights.h).
    explicit LoraLinearImpl(const torch::nn::LinearOptions& options);

    // input: [..., in_features] -> [..., out_features]
    torch::Tensor forward(const torch::Tensor& input);

    // Adds an adapter (tensors are cast to the weight's device and dtype). Throws InvalidArgument
    // when the name is taken, the shapes do not fit this layer, or ranks of down/up differ.
    void add_adapter(const std::string& name, const torch::Tensor& down, const torch::Tensor& up,
                     double alpha, double weight = 1.0, bool rslora = false);
    // Throws InvalidArgument when the adapter is fused (unfuse() first). No-op when absent.
    void delete_adapter(const std::string& name);
    // Drops every adapter. A fused weight stays as it is (diffusers' fuse + unload bakes it in).
    void clear_adapters();

    bool has_adapter(const std::string& name) const;
    const std::vector<LoraAdapter>& adapters() const { return adapters_; }
    // Throws InvalidArgument when absent.
    LoraAdapter& adapter(const std::string& name);

    // Merges the given adapters (those present here and not yet merged; empty: the active ones)
    // into the weight, each scaled by lora_scale * scaling(). The first fuse keeps the weight.
    void fuse(double lora_scale = 1.0, const std::vector<std::string>& names = {});
    // Restores the weight kept by the first fuse (bit-exact); adapters stay loaded, unmerged.
    void unfuse();
    bool fused() const { return original_weight_.defined(); }

    // Moves the adapters to the weight's device and dtype now (forward does it on first use).
    void place_adapters();

    // Switches the unfused LoRA branch off / on (a fused weight is unaffected).
    void set_lora_enabled(bool enabled) { enabled_ = enabled; }
    bool lora_enabled() const { return enabled_; }

private:
    void place(LoraAdapter& a) const;  // onto the weight's device / dtype

    std::vector<LoraAdapter> adapters_;  // in load order (the order the branches are summed)
    torch::Tensor original_weight_;      // the weight before the first fuse, or undefined
    bool enabled_ = true;
};
TORCH_MODULE(LoraLinear);

// layer->forward(x), with the adapters when layer holds a LoraLinearImpl.
torch::Tensor lora_forward(const torch::nn::Linear& layer, const torch::Tensor& x);
// A torch::nn::Linear whose implementation is a LoraLinearImpl.
torch::nn::Linear make_lora_linear(int64_t in_features, int64_t out_features, bool bias = true);

// One LoRA-capable model of a pipeline and the names its keys carry.
struct LoraTarget {
    std::string prefix;  // the key prefix diffusers uses: "prior", "text_encoder"
    torch::nn::Module* module = nullptr;
    // kohya / A1111 key prefixes (underscore module names): {"lora_unet", "lora_prior"},
    // {"lora_te", "lora_te1"}.
    std::vector<std::string> kohya_prefixes;
    // A module-path prefix some checkpoints carry and the module tree lacks, written on save:
    // "text_model." for transformers' CLIPTextModel.
    std::string legacy_module_prefix;
};

// The targets of WuerstchenPriorPipeline (diffusers: unet_name = "prior", text_encoder).
std::vector<LoraTarget> prior_pipeline_lora_targets(torch::nn::Module& prior,
                                                    torch::nn::Module& text_encoder);

// Reads a LoRA checkpoint (a .safetensors file, or a folder holding
// pytorch_lora_weights.safetensors) and adds it as adapter `adapter_name` with weight `scale` to
// the targeted layers. Keys:
//   peft / diffusers  <prefix>.<module>.lora_A.weight, .lora_B.weight (also .lora.down/.up,
//                     .lora_linear_layer.down/.up, and attention processors' to_q_lora ...);
//                     keys without any known prefix are taken as the first target's
//   kohya (dots)      <prefix>.<module>.lora_down.weight, .lora_up.weight, .alpha
//   kohya (A1111)     lora_unet_<module_with_underscores>.lora_down.weight, lora_te_..., .alpha
// Everything is checked before anything is applied; all problems go into one WeightError naming
// the file and keys: a key that matches no Linear layer, a lora_A without lora_B (or the
// reverse), a rank mismatch, a shape that does not fit the layer. Throws InvalidArgument when
// adapter_name is already loaded or scale is not finite, IoError when the file is missing.
// An empty adapter_name picks "default_<n>". Returns the number of layers adapted.
int load_lora_adapter(const std::string& path, const std::vector<LoraTarget>& targets,
                      const std::string& adapter_name = "default", double scale = 1.0);

// Writes adapter `adapter_name` (empty: the only one loaded) of the targets as peft keys
// "<prefix>.<legacy_module_prefix><module>.lora_{A,B}.weight" to `path` (a .safetensors file,
// or a folder that gets pytorch_lora_weights.safetensors). When some alpha differs from its rank
// (or rslora is used), diffusers' "lora_adapter_metadata" (r, lora_alpha, rank_pattern,
// alpha_pattern, target_modules, use_rslora per prefix) keeps the scaling. Throws
// InvalidArgument for an unknown or ambiguous adapter, IoError on write failure.
void save_lora_adapter(const std::string& path, const std::vector<LoraTarget>& targets,
                       const std::string& adapter_name = "");

// Adapter names loaded in any LoraLinear of the modules, in load order.
std::vector<std::string> lora_adapter_names(const std::vector<torch::nn::Module*>& modules);
// Activates `names` with `weights` (empty: 1.0 each; one value: for all) and deactivates every
// other adapter. Throws InvalidArgument naming an adapter that is not loaded.
void set_lora_adapters(const std::vector<torch::nn::Module*>& modules,
                       const std::vector<std::string>& names,
                       const std::vector<double>& weights = {});
// fuse / unfuse / enable / delete / clear over every LoraLinear of the modules.
void fuse_lora(const std::vector<torch::nn::Module*>& modules, double lora_scale = 1.0,
               const std::vector<std::string>& names = {});
void unfuse_lora(const std::vector<torch::nn::Module*>& modules);
void set_lora_enabled(const std::vector<torch::nn::Module*>& modules, bool enabled);
// place_adapters() on every LoraLinear of the modules.
void place_lora_adapters(const std::vector<torch::nn::Module*>& modules);
void delete_lora_adapters(const std::vector<torch::nn::Module*>& modules,
                          const std::vector<std::string>& names);
void unload_lora(const std::vector<torch::nn::Module*>& modules);

}  // namespace wuerstchen
