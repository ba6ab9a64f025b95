// Weight loading: exact key/shape comparison, one WeightError listing every problem, dtype casts,
// sharded checkpoints and transformers' legacy key names.

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>

#include "test_util.h"
#include "wuerstchen/error.h"
#include "wuerstchen/prior.h"
#include "wuerstchen/safetensors.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {
namespace {

struct TinyImpl : torch::nn::Module {
    TinyImpl() {
        fc = register_module("fc", torch::nn::Linear(3, 2));
        norm = register_module("norm", torch::nn::BatchNorm2d(2));
    }
    torch::nn::Linear fc{nullptr};
    torch::nn::BatchNorm2d norm{nullptr};
};
TORCH_MODULE(Tiny);

std::vector<std::pair<std::string, torch::Tensor>> good_tensors() {
    return {{"fc.weight", torch::arange(6, torch::kFloat32).reshape({2, 3})},
            {"fc.bias", torch::tensor({0.5f, -0.5f})},
            {"norm.weight", torch::ones({2})},
            {"norm.bias", torch::zeros({2})},
            {"norm.running_mean", torch::tensor({0.1f, 0.2f})},
            {"norm.running_var", torch::tensor({1.5f, 2.5f})},
            {"norm.num_batches_tracked", torch::tensor(7, torch::kInt64).reshape({})}};
}

class WeightsTest : public ::testing::Test {
protected:
    void SetUp() override { dir_ = test::make_temp_dir("weights_test_"); }
    std::string dir_;
};

TEST_F(WeightsTest, LoadsAndCasts) {
    const std::string path = dir_ + "/model.safetensors";
    save_safetensors(path, good_tensors());
    for (auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
        Tiny m;
        LoadOptions opts;
        opts.dtype = dtype;
        load_weights(*m, find_weight_files(dir_, "model"), opts);
        prepare_module(*m, opts);
        EXPECT_EQ(m->fc->weight.scalar_type(), dtype);
        EXPECT_EQ(m->norm->num_batches_tracked.scalar_type(), torch::kInt64);
        EXPECT_FLOAT_EQ(m->fc->weight[1][2].item<float>(), 5.0f);
        EXPECT_FLOAT_EQ(m->norm->running_var[1].item<float>(), 2.5f);
        EXPECT_FALSE(m->fc->weight.requires_grad());
    }
}

TEST_F(WeightsTest, ReportsEveryProblemInOneError) {
    auto tensors = good_tensors();
    tensors.erase(tensors.begin() + 1);                          // missing fc.bias
    tensors[0].second = torch::zeros({3, 3});                    // mis-shaped fc.weight
    tensors.push_back({"extra.weight", torch::zeros({1})});      // unexpected
    const std::string path = dir_ + "/bad.safetensors";
    save_safetensors(path, tensors);
    Tiny m;
    WUERSTCHEN_EXPECT_THROW_MSG(load_weights(*m, {path}, {}), WeightError, "bad.safetensors",
                                "missing 'fc.bias'", "unexpected 'extra.weight'",
                                "mis-shaped 'fc.weight' has shape [3, 3], the model expects [2, 3]");
}

TEST_F(WeightsTest, ShardedIndex) {
    auto tensors = good_tensors();
    save_safetensors(dir_ + "/m-00001-of-00002.safetensors", {tensors.begin(), tensors.begin() + 3});
    save_safetensors(dir_ + "/m-00002-of-00002.safetensors", {tensors.begin() + 3, tensors.end()});
    std::string index = R"({"metadata": {}, "weight_map": {)";
    for (size_t i = 0; i < tensors.size(); ++i)
        index += (i ? "," : "") + std::string("\"") + tensors[i].first + "\": \"m-0000" +
                 (i < 3 ? "1" : "2") + "-of-00002.safetensors\"";
    index += "}}";
    test::write_file(dir_ + "/model.safetensors.index.json", index);
    Tiny m;
    load_weights(*m, find_weight_files(dir_, "model"), {});
    EXPECT_FLOAT_EQ(m->fc->bias[0].item<float>(), 0.5f);
}

TEST_F(WeightsTest, IndexWithBadShardNames) {
    const std::string index_path = dir_ + "/model.safetensors.index.json";
    test::write_file(index_path, R"({"weight_map": {"fc.weight": ""}})");
    WUERSTCHEN_EXPECT_THROW_MSG(find_weight_files(dir_, "model"), WeightError,
                                "model.safetensors.index.json", "'weight_map.fc.weight'",
                                "names no shard file");
    test::write_file(index_path, R"({"weight_map": {"fc.weight": "../x.safetensors"}})");
    WUERSTCHEN_EXPECT_THROW_MSG(find_weight_files(dir_, "model"), WeightError,
                                "model.safetensors.index.json", "leaves the folder");
}

TEST_F(WeightsTest, NoWeightsNamesFolder) {
    WUERSTCHEN_EXPECT_THROW_MSG(find_weight_files(dir_, "diffusion_pytorch_model"), IoError, dir_,
                                "diffusion_pytorch_model.safetensors");
}

TEST_F(WeightsTest, LegacyTextModelKeys) {
    EXPECT_EQ(normalize_key("text_model.encoder.layers.0.mlp.fc1.weight"), "encoder.layers.0.mlp.fc1.weight");
    EXPECT_EQ(normalize_key("text_model.embeddings.position_ids"), "");
    EXPECT_EQ(normalize_key("blocks.0.depthwise.weight"), "blocks.0.depthwise.weight");
}

TEST(ParseOptions, DtypeAndDevice) {
    EXPECT_EQ(parse_dtype("fp16"), torch::kFloat16);
    EXPECT_EQ(parse_dtype("bfloat16"), torch::kBFloat16);
    EXPECT_EQ(parse_dtype("fp32"), torch::kFloat32);
    WUERSTCHEN_EXPECT_THROW_MSG(parse_dtype("int8"), InvalidArgument, "dtype", "'int8'");
    EXPECT_TRUE(parse_device("cpu").is_cpu());
    EXPECT_EQ(parse_device("cuda:1").index(), 1);
    WUERSTCHEN_EXPECT_THROW_MSG(parse_device("tpu"), InvalidArgument, "device", "'tpu'");
    // DeviceIndex is 8 bits in libtorch 1.13: cuda:200 must not wrap to cuda:-56.
    WUERSTCHEN_EXPECT_THROW_MSG(parse_device("cuda:200"), InvalidArgument, "device", "'cuda:200'");
    EXPECT_EQ(parse_device("cuda:127").index(), 127);
}

// The loaders refuse options they cannot honour with InvalidArgument, before reading weights.
TEST(ParseOptions, LoadOptionsChecked) {
    LoadOptions options;
    EXPECT_NO_THROW(check_load_options(options));
    options.dtype = torch::kFloat64;  // not a checkpoint dtype, but it runs
    EXPECT_NO_THROW(check_load_options(options));
    options.dtype = torch::kInt32;
    WUERSTCHEN_EXPECT_THROW_MSG(check_load_options(options), InvalidArgument, "`dtype`", "Int");
    WUERSTCHEN_EXPECT_THROW_MSG(load_prior(test::data_path("tiny-wuerstchen-prior/prior"), options),
                                InvalidArgument, "`dtype`");
    options = LoadOptions{};
    options.device = torch::Device(torch::kCUDA, 0);
    if (!torch::cuda::is_available())
        WUERSTCHEN_EXPECT_THROW_MSG(check_load_options(options), InvalidArgument, "`device`",
                                    "CUDA is not available");
    options.device = torch::Device(torch::kCUDA, 100);
    WUERSTCHEN_EXPECT_THROW_MSG(check_load_options(options), InvalidArgument, "`device`",
                                "cuda:100");
}

// LoadOptions::channels_last: 4-D floating tensors become NHWC; everything else is left alone.
TEST(ParseOptions, InMemoryFormat) {
    LoadOptions options;
    const torch::Tensor w = torch::randn({8, 4, 3, 3});
    EXPECT_TRUE(in_memory_format(w, options).is_same(w));
    options.channels_last = true;
    const torch::Tensor nhwc = in_memory_format(w, options);
    EXPECT_TRUE(nhwc.is_contiguous(at::MemoryFormat::ChannelsLast));
    EXPECT_FALSE(nhwc.is_contiguous());
    EXPECT_TRUE(torch::equal(nhwc, w));
    EXPECT_TRUE(in_memory_format(nhwc, options).is_same(nhwc));  // already NHWC: no copy
    const torch::Tensor matrix = torch::randn({8, 4});
    const torch::Tensor ints = torch::zeros({2, 3, 4, 5}, torch::kInt64);
    EXPECT_TRUE(in_memory_format(matrix, options).is_same(matrix));
    EXPECT_TRUE(in_memory_format(ints, options).is_same(ints));
}

}  // namespace
}  // namespace wuerstchen
