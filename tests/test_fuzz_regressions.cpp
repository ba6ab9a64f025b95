// Inputs found (or confirmed) by the libFuzzer targets in fuzz/: each once crashed, overflowed
// the stack, wrote out of bounds, asked for a huge allocation or was silently misread. Each must
// now end in the typed error (or load correctly) — run these under scripts/sanitize.sh too.

#include <gtest/gtest.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"
#include "wuerstchen/safetensors.h"
#include "wuerstchen/weights.h"

namespace wuerstchen {
namespace {

std::string nested(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

// A safetensors file: 8-byte little-endian header length, header, data.
std::string safetensors_bytes(const std::string& header, const std::string& data) {
    std::string bytes(8, '\0');
    const uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    return bytes + header + data;
}

std::string write_safetensors(const std::string& name, const std::string& header,
                              const std::string& data) {
    const std::string path = test::make_temp_dir("fuzz_reg_st_") + "/" + name;
    test::write_file(path, safetensors_bytes(header, data));
    return path;
}

// The legacy tiny tokenizer folder with one file replaced (or added).
std::string legacy_tokenizer_with(const std::string& file, const std::string& content) {
    const std::string src = test::data_path("tiny-wuerstchen-prior/tokenizer");
    const std::string dir = test::make_temp_dir("fuzz_reg_tok_");
    for (const char* f :
         {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"})
        test::write_file(dir + "/" + f, read_text_file(src + "/" + f));
    test::write_file(dir + "/" + file, content);
    return dir;
}

// The tokenizer.json tiny tokenizer folder with one file replaced.
std::string modern_tokenizer_with(const std::string& file, const std::string& content) {
    const std::string src = test::data_path("tiny-wuerstchen/tokenizer");
    const std::string dir = test::make_temp_dir("fuzz_reg_tok_");
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
        test::write_file(dir + "/" + f, read_text_file(src + "/" + f));
    test::write_file(dir + "/" + file, content);
    return dir;
}

// ------------------------------------------------------------------ config JSON

// dump() of the offending value for the error message recursed once per level: stack overflow.
TEST(FuzzRegression, ConfigDeeplyNestedValue) {
    const std::string text = "{\"vocab_size\": " + nested(200000) + "}";
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTextConfig::from_json_text(text, "cfg.json"), ConfigError,
                                "cfg.json", "nested deeper than");
    WUERSTCHEN_EXPECT_THROW_MSG(ModelIndex::from_json_text(text, "model_index.json"), ConfigError,
                                "model_index.json", "nested deeper than");
}

// Moderate nesting (a real config never exceeds a handful of levels) still parses, and a wrongly
// typed nested value is still reported with its text.
TEST(FuzzRegression, ConfigModerateNestingStillParses) {
    const std::string text = "{\"vocab_size\": " + nested(100) + "}";
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTextConfig::from_json_text(text, "cfg.json"), ConfigError,
                                "cfg.json", "'vocab_size'", "must be an integer");
}

// Unsigned integers above INT64_MAX wrapped through get<int64_t>(): 2^64-1 was read as -1.
TEST(FuzzRegression, ConfigUnsignedIntegerAboveInt64) {
    const std::string text =
        R"({"c_hidden": [8], "nhead": [18446744073709551615], "blocks": [1],
            "level_config": ["CT"], "inject_effnet": [false], "dropout": [0.0]})";
    WUERSTCHEN_EXPECT_THROW_MSG(DiffNeXtConfig::from_json_text(text, "decoder/config.json"),
                                ConfigError, "decoder/config.json", "'nhead'", "out of range");
    WUERSTCHEN_EXPECT_THROW_MSG(
        PriorConfig::from_json_text(R"({"c_r": 9223372036854775808})", "prior/config.json"),
        ConfigError, "prior/config.json", "'c_r'", "out of range");
    // In range unsigned values are unchanged.
    EXPECT_EQ(PriorConfig::from_json_text(R"({"c_r": 64})", "p").c_r, 64);
}

// ------------------------------------------------------------------ safetensors

TEST(FuzzRegression, SafeTensorsDeeplyNestedHeader) {
    const std::string path =
        write_safetensors("deep.safetensors", "{\"x\": " + nested(300000) + "}", "");
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, path, "nested deeper than");
}

// An empty tensor between two overlapping ones hid the overlap: neighbours of an empty range
// were skipped instead of compared with each other.
TEST(FuzzRegression, SafeTensorsOverlapBehindEmptyTensor) {
    const std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                               R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})";
    const std::string path =
        write_safetensors("overlap.safetensors", header, std::string(16, '\0'));
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, path, "'a'", "'b'",
                                "overlap");
}

// Empty tensors anywhere (also at the same offset as data) are still fine.
TEST(FuzzRegression, SafeTensorsEmptyTensorsInsideData) {
    const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("e":{"dtype":"I64","shape":[3,0],"data_offsets":[4,4]},)"
                               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
    const std::string path = write_safetensors("empty.safetensors", header, std::string(12, '\0'));
    SafeTensors st = SafeTensors::open(path);
    EXPECT_EQ(st.tensor("e").numel(), 0);
    EXPECT_EQ(st.tensor("e").sizes(), torch::IntArrayRef({3, 0}));
}

// Zero elements but dimensions whose product overflows int64: the contiguous strides would
// overflow, which libtorch 2.x reports as a c10::Error from torch::empty (1.13 did not check).
// The header is rejected, whatever the libtorch; a moderate empty shape still loads.
TEST(FuzzRegression, SafeTensorsZeroSizedHugeDims) {
    const std::string header =
        R"({"x":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],)"
        R"("data_offsets":[0,0]}})";
    const std::string path = write_safetensors("huge_dims.safetensors", header, "");
    WUERSTCHEN_EXPECT_THROW_MSG(SafeTensors::open(path), WeightError, path, "'x'",
                                "shape overflows");

    const std::string fits = R"({"x":{"dtype":"F32","shape":[0,4294967296,1073741824],)"
                             R"("data_offsets":[0,0]}})";
    SafeTensors st = SafeTensors::open(write_safetensors("big_empty.safetensors", fits, ""));
    EXPECT_EQ(st.tensor("x").numel(), 0);
    EXPECT_EQ(st.tensor("x").sizes(), torch::IntArrayRef({0, 4294967296, 1073741824}));
}

TEST(FuzzRegression, WeightIndexDeeplyNested) {
    const std::string dir = test::make_temp_dir("fuzz_reg_index_");
    test::write_file(dir + "/model.safetensors.index.json",
                     "{\"weight_map\": {\"a\": " + nested(300000) + "}}");
    WUERSTCHEN_EXPECT_THROW_MSG(find_weight_files(dir, "model"), WeightError,
                                "model.safetensors.index.json", "nested deeper than");
}

// ------------------------------------------------------------------ tokenizer

// A negative added-token id indexed id_to_token[-5]: a write before the vector (UBSan/ASan).
TEST(FuzzRegression, TokenizerNegativeAddedTokenId) {
    const std::string dir = legacy_tokenizer_with("added_tokens.json", R"({"<neg>": -5})");
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError,
                                "added_tokens.json", "<neg>", "negative id");
}

// An id above INT64_MAX arrived as a negative int64 through get<int64_t>().
TEST(FuzzRegression, TokenizerJsonAddedTokenIdWraps) {
    nlohmann::json tj = nlohmann::json::parse(
        read_text_file(test::data_path("tiny-wuerstchen/tokenizer/tokenizer.json")));
    tj["added_tokens"].push_back({{"id", 18446744073709551615ull}, {"content", "<wrap>"}});
    const std::string dir = modern_tokenizer_with("tokenizer.json", tj.dump());
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError,
                                "tokenizer.json", "<wrap>", "negative id");
}

TEST(FuzzRegression, TokenizerAddedTokensDecoderKeys) {
    for (const char* key : {"-1", "12abc", "", " 7", "99999999999999999999"}) {
        nlohmann::json config = nlohmann::json::parse(read_text_file(
            test::data_path("tiny-wuerstchen-prior/tokenizer/tokenizer_config.json")));
        config["added_tokens_decoder"][key] = {{"content", "<x>"}};
        const std::string dir = legacy_tokenizer_with("tokenizer_config.json", config.dump());
        WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError,
                                    "tokenizer_config.json", "added_tokens_decoder", "not an id");
    }
}

// An id of 10^12 sized the id -> token table: a multi-TiB allocation (std::bad_alloc or an
// ASan abort). Sparse ids now load and decode.
TEST(FuzzRegression, TokenizerHugeAddedTokenId) {
    const std::string dir =
        legacy_tokenizer_with("added_tokens.json", R"({"<far>": 1000000000000})");
    const CLIPTokenizer tok = CLIPTokenizer::from_pretrained(dir);
    EXPECT_EQ(tok.decode({1000000000000}), "<far>");
    const std::vector<int64_t> ids = tok.encode("a <far> b");
    ASSERT_EQ(ids.size(), 5u);
    EXPECT_EQ(ids[2], 1000000000000);
    // Unknown and negative ids are skipped by decode, as before.
    EXPECT_EQ(tok.decode({-1, 999999999999, 1000000000000}), "<far>");
}

// dump() of a deeply nested merge entry (for the error message) overflowed the stack.
TEST(FuzzRegression, TokenizerJsonDeeplyNestedMerge) {
    const std::string text =
        R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [)" + nested(300000) + "]}}";
    const std::string dir = modern_tokenizer_with("tokenizer.json", text);
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError,
                                "tokenizer.json", "nested deeper than");
}

}  // namespace
}  // namespace wuerstchen
