// safetensors reader/writer: round trip, metadata, and every malformed-header case named in the
// Foundation issue. Each error test checks the type and that the message names the file.

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "test_util.h"
#include "wuerstchen/error.h"
#include "wuerstchen/safetensors.h"

namespace wuerstchen {
namespace {

// A file from a header JSON and a data region of `data_bytes` zero bytes.
std::string make_file(const std::string& dir, const std::string& name, const std::string& header,
                      size_t data_bytes, int64_t declared_len = -1) {
    std::string bytes(8, '\0');
    const uint64_t n = declared_len >= 0 ? static_cast<uint64_t>(declared_len) : header.size();
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    bytes += header;
    bytes += std::string(data_bytes, '\0');
    const std::string path = dir + "/" + name;
    test::write_file(path, bytes);
    return path;
}

class SafeTensorsTest : public ::testing::Test {
protected:
    void SetUp() override { dir_ = test::make_temp_dir("st_test_"); }
    std::string dir_;
};

TEST_F(SafeTensorsTest, ReadsFixtureWithMetadata) {
    SafeTensors st = test::reference("prior_forward");
    EXPECT_EQ(st.size(), 5u);
    EXPECT_TRUE(st.contains("out"));
    EXPECT_EQ(st.info("x").shape, (std::vector<int64_t>{2, 16, 6, 5}));
    EXPECT_EQ(st.info("x").dtype, DType::F32);
    EXPECT_TRUE(st.metadata().count("info"));
    torch::Tensor x = st.tensor("x");
    EXPECT_EQ(x.sizes(), torch::IntArrayRef({2, 16, 6, 5}));
    EXPECT_TRUE(torch::isfinite(x).all().item<bool>());
}

TEST_F(SafeTensorsTest, RoundTripAllDtypes) {
    const std::string path = dir_ + "/round.safetensors";
    auto f = torch::randn({3, 4});
    std::vector<std::pair<std::string, torch::Tensor>> tensors = {
        {"f32", f},
        {"f16", f.to(torch::kFloat16)},
        {"bf16", f.to(torch::kBFloat16)},
        {"i64", torch::arange(7, torch::kInt64)},
        {"i32", torch::arange(5, torch::kInt32)},
        {"scalar", torch::tensor(3.5f).reshape({})},
        {"empty", torch::zeros({0, 3})}};
    save_safetensors(path, tensors, {{"format", "pt"}});
    SafeTensors st = SafeTensors::open(path);
    EXPECT_EQ(st.metadata().at("format"), "pt");
    for (const auto& [name, t] : tensors) {
        torch::Tensor back = st.tensor(name);
        EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
        EXPECT_TRUE(torch::equal(back, t)) << name;
    }
}

TEST_F(SafeTensorsTest, ViewOutlivesTheReader) {
    const std::string path = dir_ + "/alive.safetensors";
    save_safetensors(path, {{"a", torch::arange(16, torch::kFloat32)}});
    torch::Tensor t;
    {
        SafeTensors st = SafeTensors::open(path);
        t = st.tensor("a");
    }
    EXPECT_FLOAT_EQ(t[15].item<float>(), 15.0f);
}

TEST_F(SafeTensorsTest, MissingFileIsIoError) {
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(dir_ + "/nope.safetensors"), IoError,
                                "nope.safetensors");
}

TEST_F(SafeTensorsTest, TruncatedFile) {
    const std::string path = dir_ + "/short.safetensors";
    test::write_file(path, "abc");
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, "short.safetensors",
                                "truncated");
}

TEST_F(SafeTensorsTest, TruncatedData) {
    const std::string path = make_file(
        dir_, "cut.safetensors", R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, "cut.safetensors", "'a'",
                                "outside the data region");
}

TEST_F(SafeTensorsTest, HeaderLengthBeyondFileSize) {
    const std::string path = make_file(dir_, "len.safetensors", "{}", 0, 1 << 20);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, "len.safetensors",
                                "exceeds the file size");
    const std::string huge = make_file(dir_, "huge.safetensors", "{}", 0, INT64_MAX);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(huge), WeightError, "huge.safetensors");
}

TEST_F(SafeTensorsTest, InvalidHeaderJson) {
    const std::string path = make_file(dir_, "json.safetensors", "{\"a\": [1, 2", 0);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, "json.safetensors",
                                "invalid header JSON");
    const std::string arr = make_file(dir_, "arr.safetensors", "[1,2]", 0);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(arr), WeightError, "arr.safetensors",
                                "not a JSON object");
}

TEST_F(SafeTensorsTest, OffsetsOutsideData) {
    const std::string path = make_file(
        dir_, "out.safetensors", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 8);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, "out.safetensors", "'a'",
                                "outside the data region");
    const std::string rev = make_file(
        dir_, "rev.safetensors", R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(rev), WeightError, "rev.safetensors", "'a'");
    const std::string neg = make_file(
        dir_, "neg.safetensors", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(neg), WeightError, "neg.safetensors", "'a'");
}

TEST_F(SafeTensorsTest, OverlappingTensors) {
    const std::string path = make_file(dir_, "overlap.safetensors",
                                       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                                           "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                       12);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, "overlap.safetensors",
                                "overlap", "'a'", "'b'");
}

TEST_F(SafeTensorsTest, ByteLengthNotShapeTimesDtype) {
    const std::string path = make_file(
        dir_, "len2.safetensors", R"({"w":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}})", 8);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, "len2.safetensors", "'w'",
                                "does not match shape x dtype size");
    const std::string ovf = make_file(
        dir_, "ovf.safetensors",
        R"({"w":{"dtype":"F32","shape":[4611686018427387904, 8],"data_offsets":[0,8]}})", 8);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(ovf), WeightError, "ovf.safetensors", "'w'");
}

TEST_F(SafeTensorsTest, UnsupportedDtype) {
    const std::string path = make_file(
        dir_, "f64.safetensors", R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8);
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, "f64.safetensors", "'d'",
                                "unsupported dtype 'F64'");
}

TEST_F(SafeTensorsTest, MissingKeyNamesFileAndKey) {
    SafeTensors st = test::reference("prior_forward");
    WUERSTCHEN_EXPECT_THROW_MSG(st.tensor("nope"), WeightError, "prior_forward.safetensors",
                                "'nope'");
}

TEST_F(SafeTensorsTest, SaveRejectsUnsupportedDtype) {
    WUERSTCHEN_EXPECT_THROW_MSG(
        save_safetensors(dir_ + "/x.safetensors", {{"d", torch::zeros({2}, torch::kFloat64)}}),
        InvalidArgument, "'d'");
}

// The header is JSON: names and metadata that are not UTF-8 are refused, not an escaped
// nlohmann exception.
TEST_F(SafeTensorsTest, SaveRejectsNamesThatAreNotUtf8) {
    const std::string bad = "w\xff\xfe";
    WUERSTCHEN_EXPECT_THROW_MSG(
        save_safetensors(dir_ + "/x.safetensors", {{bad, torch::zeros({2})}}), InvalidArgument,
        "UTF-8");
    WUERSTCHEN_EXPECT_THROW_MSG(
        save_safetensors(dir_ + "/x.safetensors", {{"w", torch::zeros({2})}}, {{"note", bad}}),
        InvalidArgument, "UTF-8");
}

}  // namespace
}  // namespace wuerstchen
