#pragma once

// Walks over a module tree without the dotted names that torch::nn::Module's recursive listings
// (modules(), parameters(), buffers(), named_*) build for every entry. Those listings take about
// half a millisecond for the real prior or decoder, and a pipeline call used several of them
// before its first kernel, while the device waited.

#include <torch/nn/module.h>

#include <type_traits>

namespace wuerstchen {

// Calls f(m) for `module` and every module below it, parents before children and children in
// registration order (the order of Module::modules(), and of parameters() when f lists each
// module's own). Stops at the first f that returns true; returns whether one did.
// Module: torch::nn::Module or const torch::nn::Module (f gets each module as such; pass a
// model's Impl as a torch::nn::Module reference).
template <class Module, class F>
bool visit_modules(Module& module, F&& f) {
    static_assert(std::is_same_v<std::remove_const_t<Module>, torch::nn::Module>,
                  "visit_modules: pass a torch::nn::Module reference");
    if (f(module)) return true;
    for (const auto& child : module.children())
        if (visit_modules(static_cast<Module&>(*child), f)) return true;
    return false;
}

}  // namespace wuerstchen
