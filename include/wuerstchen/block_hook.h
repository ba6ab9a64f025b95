#pragma once

// The seam sequential offload uses: a model whose forward runs a list of blocks calls a
// BlockHook (when one is set) just before and just after each of its offload units, in the order
// of the model's offload_units(). With no hook set the forward is unchanged.

#include <utility>

namespace torch::nn {
class Module;
}  // namespace torch::nn

namespace wuerstchen {

class BlockHook {
public:
    virtual ~BlockHook() = default;
    virtual void before(const torch::nn::Module& unit) = 0;
    virtual void after(const torch::nn::Module& unit) = 0;
};

// f() between hook->before(unit) and hook->after(unit); just f() when hook is null.
template <typename F>
auto run_unit(BlockHook* hook, const torch::nn::Module& unit, F&& f) {
    if (hook == nullptr) return std::forward<F>(f)();
    hook->before(unit);
    auto out = std::forward<F>(f)();
    hook->after(unit);
    return out;
}

}  // namespace wuerstchen
