#pragma once

// Shared helpers for the test suite: fixture paths, reference tensors, tolerance checks that
// print the measured error.

#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <array>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "wuerstchen/safetensors.h"
#include "wuerstchen/weights.h"

namespace wuerstchen::test {

// tests/data/<rel>
std::string data_path(const std::string& rel);
// ../shared/<rel> beside the project (may not exist).
std::string shared_path(const std::string& rel);
bool file_exists(const std::string& path);

// A reference file under tests/data/references/<name>.safetensors.
SafeTensors reference(const std::string& name);
// One tensor of it as float32 (or its integer dtype), contiguous, owned.
torch::Tensor ref_tensor(const SafeTensors& file, const std::string& key);

// max |a - b| (as double; shapes must match).
double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b);

// Asserts shapes match and max|actual - expected| <= tol, printing the measured error with `what`.
::testing::AssertionResult all_close(const std::string& what, const torch::Tensor& actual,
                                     const torch::Tensor& expected, double tol);
// Tolerance relative to the reference's scale: rel * max(1, max|expected|).
double scaled_tol(const torch::Tensor& expected, double rel);

// While it lives, CUDA float32 work runs without TF32: cuDNN convolutions use it by default on
// Ampere and later (as PyTorch's do), which alone moves fp32 results by about 1e-3 relative and
// more after a few denoising steps. For fp32 parity checks on CUDA; restores the settings after.
class NoTf32 {
public:
    NoTf32()
        : cudnn_(at::globalContext().allowTF32CuDNN()),
          cublas_(at::globalContext().allowTF32CuBLAS()) {
        at::globalContext().setAllowTF32CuDNN(false);
        at::globalContext().setAllowTF32CuBLAS(false);
    }
    ~NoTf32() {
        at::globalContext().setAllowTF32CuDNN(cudnn_);
        at::globalContext().setAllowTF32CuBLAS(cublas_);
    }
    NoTf32(const NoTf32&) = delete;
    NoTf32& operator=(const NoTf32&) = delete;

private:
    bool cudnn_;
    bool cublas_;
};

// A fresh temporary directory (removed by the caller if wanted, with remove_tree).
std::string make_temp_dir(const std::string& prefix);
// Removes a folder and everything in it (no error if it is gone). With the C library, not
// std::filesystem::remove_all: PyTorch wheels' libtorch.so exports its own copy of that, which
// the dynamic linker binds callers to, and which crashed when called on libtorch 2.11.
void remove_tree(const std::string& path);
void write_file(const std::string& path, const std::string& bytes);

// Same module tree (types and options as printed), parameter and buffer names, shapes and
// dtypes, in the same order; buffers also equal in value.
void expect_same_structure(const torch::nn::Module& a, const torch::nn::Module& b);
// Every parameter and buffer bit-equal (same order).
void expect_same_values(const torch::nn::Module& a, const torch::nn::Module& b);
// The parameters of `module` whose names end with `suffix` (e.g. "kv_mapper.1.weight"), in
// registration order.
std::vector<torch::Tensor> parameters_named(const torch::nn::Module& module,
                                            const std::string& suffix);
// Whether those (at least two) are stored back to back in one buffer, in that order: the layout
// of pack_condition_mappers (nn::LinearGroup::pack).
bool stored_back_to_back(const torch::nn::Module& module, const std::string& suffix);

// The attention modules of `module` (those with the three projections `names`: diffusers' to_q,
// to_k, to_v, or CLIP's q_proj, k_proj, v_proj) and how many of them store the three weights
// back to back in one buffer, and the three biases in another: the layout of
// pack_attention_projections.
struct ProjectionLayout {
    int attention = 0;
    int packed = 0;
};
inline const std::array<std::string, 3> kClipProjections = {"q_proj", "k_proj", "v_proj"};
ProjectionLayout attention_projection_layout(const torch::nn::Module& module,
                                             const std::array<std::string, 3>& names = {
                                                 "to_q", "to_k", "to_v"});

// How many first channelwise layers ("channelwise.0.weight") of `module` are laid out with
// `width` spare columns in front of each row: the layout of fold_effnet_mappers.
int folded_layer_count(const torch::nn::Module& module, int64_t width);

// LoadOptions as for model offload, on the default device: the loaders then leave the models'
// condition mappers unpacked (each block maps its own condition).
LoadOptions unpacked_load();

// How many times each of `ops` (ATen names, e.g. "aten::silu") is dispatched on this thread
// while `run` runs (nested calls included).
std::map<std::string, int> count_ops(const std::vector<std::string>& ops,
                                     const std::function<void()>& run);

}  // namespace wuerstchen::test

// EXPECT_THROW with a check that the message contains every given fragment.
#define WUERSTCHEN_EXPECT_THROW_MSG(stmt, ErrorType, ...)                                   \
    do {                                                                                  \
        bool caught_ = false;                                                             \
        try {                                                                             \
            stmt;                                                                         \
        } catch (const ErrorType& e_) {                                                   \
            caught_ = true;                                                               \
            const std::string msg_ = e_.what();                                           \
            for (const std::string& frag_ : std::initializer_list<std::string>{__VA_ARGS__})                              \
                EXPECT_NE(msg_.find(frag_), std::string::npos)                            \
                    << "message '" << msg_ << "' lacks '" << frag_ << "'";                \
        } catch (const std::exception& other_) {                                          \
            ADD_FAILURE() << "expected " #ErrorType ", got: " << other_.what();           \
        }                                                                                 \
        EXPECT_TRUE(caught_) << "expected " #ErrorType " from " #stmt;                    \
    } while (0)
