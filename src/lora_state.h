#pragma once

// What a LoraLinear layer adds to its Linear's output, as raw bytes, for the places that must tell
// whether that changed: the CUDA graphs' weights_fingerprint and a mapped condition's ModuleSeen.

#include <torch/types.h>

#include <string>

#include "wuerstchen/lora.h"

namespace wuerstchen {

// Appends `value`'s bytes to `out`.
template <class T>
void append_bytes(std::string& out, const T& value) {
    out.append(reinterpret_cast<const char*>(&value), sizeof(value));
}

// Appends the layer's LoRA state to `out`: whether its branch is enabled and whether it is fused,
// then each adapter's name, scales and flags, calling on_tensor(out, t) for its down and up
// tensors (each caller notes those its own way). Appends nothing for a layer without adapters
// that was never fused.
template <class OnTensor>
void append_lora_state(std::string& out, const LoraLinearImpl& layer, OnTensor&& on_tensor) {
    if (layer.adapters().empty() && !layer.fused()) return;
    out += 'L';
    append_bytes(out, layer.lora_enabled());
    append_bytes(out, layer.fused());
    for (const auto& a : layer.adapters()) {
        out += a.name;
        out += '\0';
        on_tensor(out, a.down);
        on_tensor(out, a.up);
        append_bytes(out, a.weight);
        append_bytes(out, a.alpha);
        append_bytes(out, a.rslora);
        append_bytes(out, a.active);
        append_bytes(out, a.merged);
    }
}

}  // namespace wuerstchen
