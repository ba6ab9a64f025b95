#include "nn/linear_group.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/utils.h>

#include "lora_state.h"
#include "module_walk.h"
#include "nn/functional.h"
#include "wuerstchen/lora.h"

namespace wuerstchen::nn {

bool lora_contributes(const torch::nn::LinearImpl& layer) {
    const auto* lora = dynamic_cast<const LoraLinearImpl*>(&layer);
    if (lora == nullptr || !lora->lora_enabled()) return false;
    for (const auto& a : lora->adapters())
        if (a.active && !a.merged && a.weight != 0.0) return true;
    return false;
}

torch::Tensor buffer_view(const torch::Tensor& t, c10::IntArrayRef sizes,
                          c10::IntArrayRef strides) {
    return at::empty({0}, t.options()).set_(t.storage(), t.storage_offset(), sizes, strides);
}

bool rows_back_to_back(const std::vector<torch::nn::LinearImpl*>& layers,
                       torch::Tensor torch::nn::LinearImpl::*member) {
    if (layers.empty() || !(layers[0]->*member).defined()) return false;
    const torch::Tensor& first = layers[0]->*member;
    const auto* base = static_cast<const char*>(first.data_ptr());
    int64_t offset = 0;  // elements of the buffer before this layer's
    for (const auto* layer : layers) {
        const torch::Tensor& t = layer->*member;
        if (!t.defined() || !t.is_alias_of(first) || !t.is_contiguous() ||
            t.scalar_type() != first.scalar_type() ||
            static_cast<const char*>(t.data_ptr()) != base + offset * first.element_size())
            return false;
        offset += t.numel();
    }
    return true;
}

void put_rows_back_to_back(const std::vector<torch::nn::LinearImpl*>& layers,
                           torch::Tensor torch::nn::LinearImpl::*member) {
    if (layers.empty() || rows_back_to_back(layers, member)) return;
    // set_data refuses inference tensors: the buffer is made outside InferenceMode.
    c10::InferenceMode not_inference(/*enabled=*/false);
    torch::NoGradGuard no_grad;
    const torch::Tensor& first = layers[0]->*member;
    std::vector<int64_t> sizes = first.sizes().vec();
    sizes[0] = 0;
    for (const auto* layer : layers) sizes[0] += (layer->*member).size(0);
    const auto buffer = at::empty(sizes, first.options());
    int64_t offset = 0;
    for (auto* layer : layers) {
        torch::Tensor& t = layer->*member;
        auto rows = buffer.narrow(0, offset, t.size(0));
        rows.copy_(t);
        offset += t.size(0);
        t.set_data(rows);
    }
}

namespace {

bool has_shape(const torch::Tensor& t, std::initializer_list<int64_t> sizes) {
    return t.defined() && t.sizes() == c10::IntArrayRef(sizes);
}

}  // namespace

LinearGroup::LinearGroup(std::vector<torch::nn::LinearImpl*> layers) : layers_(std::move(layers)) {
    offsets_.reserve(layers_.size() + 1);
    offsets_.push_back(0);
    for (const auto* layer : layers_) {
        const bool shaped = layer != nullptr && layer->weight.defined() && layer->weight.dim() == 2;
        offsets_.push_back(offsets_.back() + (shaped ? layer->weight.size(0) : 0));
    }
}

bool LinearGroup::packable() const {
    if (layers_.empty() || layers_[0] == nullptr || !layers_[0]->weight.defined() ||
        layers_[0]->weight.dim() != 2)
        return false;
    const torch::Tensor& w0 = layers_[0]->weight;
    const int64_t in = w0.size(1);
    for (size_t i = 0; i < layers_.size(); ++i) {
        const auto* layer = layers_[i];
        if (layer == nullptr) return false;
        const torch::Tensor& w = layer->weight;
        const torch::Tensor& b = layer->bias;
        if (!has_shape(w, {out_features(i), in}) || !has_shape(b, {out_features(i)})) return false;
        for (const auto* t : {&w, &b})
            if (t->scalar_type() != w0.scalar_type() || t->device() != w0.device()) return false;
    }
    return true;
}

bool LinearGroup::ready(const torch::Device& device) const {
    if (!packed(device)) return false;
    const bool grad = at::GradMode::is_enabled();
    for (const auto* layer : layers_) {
        if (lora_contributes(*layer)) return false;
        if (grad && (layer->weight.requires_grad() || layer->bias.requires_grad())) return false;
    }
    return true;
}

bool LinearGroup::packed(const torch::Device& device) const {
    if (!packable() || layers_[0]->weight.device() != device) return false;
    return rows_back_to_back(layers_, &torch::nn::LinearImpl::weight) &&
           rows_back_to_back(layers_, &torch::nn::LinearImpl::bias);
}

bool LinearGroup::partly_fused() const {
    bool fused = false, unfused = false;
    for (const auto* layer : layers_) {
        const auto* lora = dynamic_cast<const LoraLinearImpl*>(layer);
        (lora != nullptr && lora->fused() ? fused : unfused) = true;
    }
    return fused && unfused;
}

bool LinearGroup::pack() {
    if (!packable() || partly_fused()) return false;
    // Weights and biases each on their own: a LoRA fuse replaces only weights, and moving the
    // biases as well would change more tensors than it must (and the graphs' key with them).
    put_rows_back_to_back(layers_, &torch::nn::LinearImpl::weight);
    put_rows_back_to_back(layers_, &torch::nn::LinearImpl::bias);
    return true;
}

torch::Tensor LinearGroup::columns(const torch::Tensor& all, size_t i) const {
    TORCH_CHECK(i < size(), "LinearGroup::columns: layer ", i, " of ", size());
    return all.narrow(-1, offset(i), out_features(i));
}

std::vector<std::pair<size_t, size_t>> LinearGroup::equal_width_runs() const {
    std::vector<std::pair<size_t, size_t>> runs;
    for (size_t i = 0; i < size();) {
        size_t j = i + 1;
        while (j < size() && out_features(j) == out_features(i)) ++j;
        runs.emplace_back(i, j - i);
        i = j;
    }
    return runs;
}

std::vector<torch::Tensor> LinearGroup::split(const torch::Tensor& all) const {
    TORCH_CHECK(all.dim() >= 1 && all.size(-1) == total_out(),
                "LinearGroup::split: expected [..., ", total_out(), "], got ", all.sizes());
    std::vector<torch::Tensor> parts;
    parts.reserve(size());
    for (const auto& [first, count] : equal_width_runs()) {
        // [..., n * w] -> [..., n, w] -> [n, ..., w], one copy.
        const auto n = static_cast<int64_t>(count);
        const int64_t width = out_features(first);
        std::vector<int64_t> sizes = all.sizes().vec();
        sizes.back() = n;
        sizes.push_back(width);
        const auto run =
            all.narrow(-1, offset(first), n * width).view(sizes).movedim(-2, 0).contiguous();
        for (const auto& part : run.unbind(0)) parts.push_back(part);
    }
    return parts;
}

torch::Tensor LinearGroup::forward(const torch::Tensor& x) const {
    TORCH_CHECK(ready(x.device()), "LinearGroup::forward: the layers are not packed on ",
                x.device());
    // Views of the whole buffers from the first layer's rows (ready() placed every layer there).
    const torch::Tensor& w0 = layers_[0]->weight;
    const int64_t in = w0.size(1);
    const auto weight = buffer_view(w0, {total_out(), in}, {in, 1});
    const auto bias = buffer_view(layers_[0]->bias, {total_out()}, {1});
    return linear_forward(x, weight, bias);
}

// ---------------------------------------------------------------------------- TensorSeen

namespace {

// Whether t has a version to note (inference tensors, and tensors that took an inference
// tensor's data, have none).
bool versioned(const torch::Tensor& t) {
    return t.defined() && t.has_storage() && !t.is_inference() &&
           t.unsafeGetTensorImpl()->version_counter().enabled();
}

}  // namespace

TensorSeen::TensorSeen(const torch::Tensor& t) {
    if (!versioned(t)) return;
    tracked_ = true;
    storage_ = t.storage().getWeakStorageImpl();
    data_ = t.data_ptr();
    version_ = t._version();
}

bool TensorSeen::matches(const torch::Tensor& t) const {
    if (!tracked() || !versioned(t)) return false;
    const auto seen = storage_.lock();
    return seen && t.storage().unsafeGetStorageImpl() == seen.get() && t.data_ptr() == data_ &&
           t._version() == version_;
}

// ---------------------------------------------------------------------------- ModuleSeen

namespace {

// The tensors whose values a module's forward reads, in a fixed order: each module's (parents
// before children) parameters, then buffers.
std::vector<torch::Tensor> module_tensors(const torch::nn::Module& module) {
    std::vector<torch::Tensor> out;
    visit_modules(module, [&out](const torch::nn::Module& m) {
        for (const auto& t : m.parameters(/*recurse=*/false)) out.push_back(t);
        for (const auto& t : m.buffers(/*recurse=*/false)) out.push_back(t);
        return false;
    });
    return out;
}

// The LoRA state of the module's LoraLinear layers (append_lora_state), with the adapters'
// tensors themselves put into `tensors` (held, so that their addresses cannot come back as
// another adapter's).
std::string lora_state(const torch::nn::Module& module, std::vector<torch::Tensor>& tensors) {
    std::string out;
    visit_modules(module, [&](const torch::nn::Module& m) {
        if (const auto* lora = dynamic_cast<const LoraLinearImpl*>(&m))
            append_lora_state(out, *lora, [&tensors](std::string&, const torch::Tensor& t) {
                tensors.push_back(t);
            });
        return false;
    });
    return out;
}

// The same tensor (object), unchanged in place since `seen` noted it where it has a version.
bool same_adapter_tensor(const torch::Tensor& now, const torch::Tensor& then,
                         const TensorSeen& seen) {
    return now.is_same(then) && (!seen.tracked() || seen.matches(now));
}

}  // namespace

ModuleSeen::ModuleSeen(torch::nn::Module& module) {
    visit_modules(module, [](torch::nn::Module& m) {
        if (auto* lora = dynamic_cast<LoraLinearImpl*>(&m)) lora->place_adapters();
        return false;
    });
    for (const auto& t : module_tensors(module)) {
        tensors_.emplace_back(t);
        tracked_ = tracked_ && tensors_.back().tracked();
    }
    lora_ = lora_state(module, adapters_);
    for (const auto& t : adapters_) adapters_seen_.emplace_back(t);
}

bool ModuleSeen::matches(const torch::nn::Module& module) const {
    if (!tracked_) return false;
    const std::vector<torch::Tensor> now = module_tensors(module);
    if (now.size() != tensors_.size()) return false;
    for (size_t i = 0; i < now.size(); ++i)
        if (!tensors_[i].matches(now[i])) return false;
    std::vector<torch::Tensor> adapters;
    if (lora_state(module, adapters) != lora_ || adapters.size() != adapters_.size()) return false;
    for (size_t i = 0; i < adapters.size(); ++i)
        if (!same_adapter_tensor(adapters[i], adapters_[i], adapters_seen_[i])) return false;
    return true;
}

// ---------------------------------------------------------------------------- InputFold

bool InputFold::laid_out(const torch::nn::LinearImpl& layer) const {
    const torch::Tensor& w = layer.weight;
    if (!w.defined() || w.dim() != 2 || w.size(1) != in_ || !w.has_storage()) return false;
    // The buffer fold() made: the weight's as fold() noted it.
    const auto storage = weight_.storage();
    return storage && w.storage().unsafeGetStorageImpl() == storage.get() &&
           w.storage_offset() == width_ && w.strides() == c10::IntArrayRef({width_ + in_, 1});
}

torch::Tensor InputFold::whole(const torch::nn::LinearImpl& layer) const {
    const torch::Tensor w = layer.weight.detach();
    return w.as_strided({w.size(0), width_ + in_}, {width_ + in_, 1}, 0);
}

bool InputFold::current(const torch::nn::LinearImpl& layer, const torch::Tensor& map_weight,
                        const torch::Tensor& map_bias) const {
    return laid_out(layer) && bias_.defined() && weight_.matches(layer.weight) &&
           bias_in_.matches(layer.bias) && map_weight_.matches(map_weight) &&
           map_bias_.matches(map_bias);
}

bool InputFold::ready(const torch::nn::LinearImpl& layer, const torch::Tensor& map_weight,
                      const torch::Tensor& map_bias, const torch::Device& device) const {
    const torch::Tensor& w = layer.weight;
    const torch::Tensor& b = layer.bias;
    if (!current(layer, map_weight, map_bias) || w.device() != device || lora_contributes(layer))
        return false;
    return !(at::GradMode::is_enabled() && (w.requires_grad() || b.requires_grad()));
}

bool InputFold::fold(torch::nn::LinearImpl& layer, const torch::Tensor& map_weight,
                     const torch::Tensor& map_bias, bool again) {
    const torch::Tensor& w = layer.weight;
    const torch::Tensor& b = layer.bias;
    if (!w.defined() || w.dim() != 2 || !has_shape(b, {w.size(0)}) || !map_weight.defined() ||
        map_weight.dim() != 2 || !has_shape(map_bias, {map_weight.size(0)}))
        return false;
    const int64_t mapped = map_weight.size(0), width = map_weight.size(1);
    if (mapped > w.size(1) || width <= 0) return false;
    for (const auto* t : {&b, &map_weight, &map_bias})
        if (t->scalar_type() != w.scalar_type() || t->device() != w.device()) return false;
    // Inference tensors (made under InferenceMode) have no version to tell a change by.
    for (const auto* t : {&w, &b, &map_weight, &map_bias})
        if (t->is_inference()) return false;
    if (!again && width == width_ && mapped == mapped_ && current(layer, map_weight, map_bias))
        return true;
    // set_data refuses inference tensors: the buffer is made outside InferenceMode.
    c10::InferenceMode not_inference(/*enabled=*/false);
    torch::NoGradGuard no_grad;
    const int64_t in = w.size(1);
    if (width != width_ || !laid_out(layer)) {
        auto storage = at::empty({w.size(0), width + in}, w.options());
        storage.narrow(1, width, in).copy_(w);
        layer.weight.set_data(storage.narrow(1, width, in));
        width_ = width;
        in_ = in;
    }
    mapped_ = mapped;
    // W_m: the weight's last `mapped` columns. The products go to the spare columns (row
    // stride width + in) and the fold's bias; in float32 for half / bfloat16 on the CPU, which
    // libtorch 1.13 cannot multiply in half precision.
    const bool widen =
        w.is_cpu() && w.scalar_type() != torch::kFloat32 && w.scalar_type() != torch::kFloat64;
    auto operand = [&](const torch::Tensor& t) {
        return widen ? t.detach().to(torch::kFloat32) : t.detach();
    };
    const auto w_m = operand(layer.weight.narrow(1, in - mapped, mapped));
    auto spare = whole(layer).narrow(1, 0, width);
    if (widen)
        spare.copy_(at::mm(w_m, operand(map_weight)));
    else
        at::mm_out(spare, w_m, map_weight.detach());
    // The same bias tensor on every fold of one layout: a CUDA graph captured after an earlier
    // fold reads it (and the spare columns) at its address, and the weights' fingerprint, which
    // would drop such graphs, does not change with values written in place.
    if (!bias_.defined() || !bias_.is_same_size(b) || bias_.scalar_type() != w.scalar_type() ||
        bias_.device() != w.device())
        bias_ = at::empty_like(b, at::MemoryFormat::Contiguous);
    bias_.copy_(at::addmv(operand(b), w_m, operand(map_bias)));
    // Noted after the writes above (a view of the weight shares its version counter).
    weight_ = TensorSeen(layer.weight);
    bias_in_ = TensorSeen(b);
    map_weight_ = TensorSeen(map_weight);
    map_bias_ = TensorSeen(map_bias);
    return true;
}

torch::Tensor InputFold::forward(const torch::nn::LinearImpl& layer, const torch::Tensor& x) const {
    TORCH_CHECK(laid_out(layer) && bias_.defined(), "InputFold::forward: the layer is not folded");
    // [u, a]: the spare columns and the weight's first in - mapped columns.
    return linear_forward(x, whole(layer).narrow(1, 0, width_ + in_ - mapped_), bias_);
}

}  // namespace wuerstchen::nn
