#include <cstdio>
#include <iostream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"

namespace wuerstchen {
namespace {

const char* const kPriorTokenizer = "tiny-wuerstchen-prior/tokenizer";  // vocab.json + merges.txt
const char* const kDecoderTokenizer = "tiny-wuerstchen/tokenizer";      // tokenizer.json

std::vector<std::string> reference_prompts(const SafeTensors& file) {
    const auto info = nlohmann::json::parse(file.metadata().at("info"));
    return info.at("prompts").get<std::vector<std::string>>();
}

// Exact comparison of ids and masks; on a mismatch, prints the first differing row.
void expect_same_encoding(const std::string& what, const BatchEncoding& enc, const SafeTensors& ref,
                          const std::string& prefix) {
    const auto ids = test::ref_tensor(ref, prefix + ".input_ids").to(torch::kInt64);
    const auto mask = test::ref_tensor(ref, prefix + ".attention_mask").to(torch::kInt64);
    ASSERT_EQ(enc.input_ids.sizes(), ids.sizes()) << what;
    ASSERT_EQ(enc.attention_mask.sizes(), mask.sizes()) << what;
    for (int64_t b = 0; b < ids.size(0); ++b) {
        EXPECT_TRUE(torch::equal(enc.input_ids[b], ids[b]))
            << what << " prompt " << b << "\n  got      " << enc.input_ids[b] << "\n  expected "
            << ids[b];
        EXPECT_TRUE(torch::equal(enc.attention_mask[b], mask[b]))
            << what << " prompt " << b << " attention mask";
    }
}

CLIPTokenizer tiny(const char* rel) { return CLIPTokenizer::from_pretrained(test::data_path(rel)); }

// A legacy-layout folder around vocab.json + merges.txt of `src` with the given pad token.
std::string legacy_folder(const std::string& src, const std::string& pad) {
    const std::string dir = test::make_temp_dir("clip_tok_");
    for (const char* f : {"vocab.json", "merges.txt"})
        test::write_file(dir + "/" + f, read_text_file(src + "/" + f));
    const nlohmann::json special = {{"bos_token", "<|startoftext|>"},
                                    {"eos_token", "<|endoftext|>"},
                                    {"pad_token", pad},
                                    {"unk_token", "<|endoftext|>"}};
    test::write_file(dir + "/special_tokens_map.json", special.dump());
    nlohmann::json config = special;
    config["model_max_length"] = 77;
    config["tokenizer_class"] = "CLIPTokenizer";
    test::write_file(dir + "/tokenizer_config.json", config.dump());
    return dir;
}

TEST(CLIPTokenizer, TinyReferencesBothLayouts) {
    const auto ref = test::reference("tokenizer_tiny");
    const auto prompts = reference_prompts(ref);
    ASSERT_EQ(prompts.size(), 10u);
    const auto prior = tiny(kPriorTokenizer);
    const auto decoder = tiny(kDecoderTokenizer);
    EXPECT_EQ(prior.pad_token_id(), 0);  // "!"
    EXPECT_EQ(decoder.pad_token_id(), decoder.eos_token_id());
    expect_same_encoding("prior (vocab.json + merges.txt)", prior(prompts), ref, "prior");
    expect_same_encoding("decoder (tokenizer.json)", decoder(prompts), ref, "decoder");
}

TEST(CLIPTokenizer, RealClipVocabulary) {
    const std::string src = test::shared_path("clip-bpe");
    if (!test::file_exists(src + "/vocab.json") || !test::file_exists(src + "/merges.txt") ||
        !test::file_exists(src + "/reference_ids.safetensors"))
        GTEST_SKIP() << "the real CLIP vocabulary is not at " << src;
    const auto ref = SafeTensors::open(src + "/reference_ids.safetensors");
    const auto prompts = reference_prompts(ref);
    for (const auto& [label, pad] :
         {std::pair<std::string, std::string>{"prior", "!"}, {"decoder", "<|endoftext|>"}}) {
        const std::string dir = legacy_folder(src, pad);
        const auto tok = CLIPTokenizer::from_pretrained(dir);
        test::remove_tree(dir);
        EXPECT_EQ(tok.vocab_size(), 49408u);
        EXPECT_EQ(tok.bos_token_id(), 49406);
        EXPECT_EQ(tok.eos_token_id(), 49407);
        expect_same_encoding("real CLIP " + label, tok(prompts), ref, label);
    }
}

TEST(CLIPTokenizer, MergesAsStringsOrPairs) {
    // tokenizers writes merges as ["a", "b"] pairs (new) or "a b" strings (old): same result.
    const std::string src = test::data_path(kDecoderTokenizer);
    auto tj = nlohmann::json::parse(read_text_file(src + "/tokenizer.json"));
    auto& merges = tj["model"]["merges"];
    for (auto& m : merges)
        if (m.is_array()) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
    const std::string dir = test::make_temp_dir("clip_tok_");
    test::write_file(dir + "/tokenizer.json", tj.dump());
    test::write_file(dir + "/tokenizer_config.json",
                     read_text_file(src + "/tokenizer_config.json"));
    const auto strings = CLIPTokenizer::from_pretrained(dir);
    test::remove_tree(dir);
    const auto pairs = tiny(kDecoderTokenizer);
    for (const std::string text : {"Anthropomorphic cat dressed as a fire fighter", "horse!!"})
        EXPECT_EQ(strings.encode(text), pairs.encode(text)) << text;
}

TEST(CLIPTokenizer, BpeOfOneWord) {
    const auto tok = tiny(kPriorTokenizer);
    // "horse" -> h, or, se</w> with the tiny merges.
    EXPECT_EQ(tok.encode("horse"), (std::vector<int64_t>{623, 71, 538, 532, 624}));
    EXPECT_EQ(tok.decode(tok.encode("horse")), "<|startoftext|>horse <|endoftext|>");
    EXPECT_EQ(tok.decode({tok.encode("fire fighter")}),
              "<|startoftext|>fire fighter <|endoftext|>");
    EXPECT_EQ(tok.vocab_size(), 625u);
    EXPECT_EQ(tok.model_max_length(), 77);
    EXPECT_EQ(tok.unk_token_id(), tok.eos_token_id());
}

TEST(CLIPTokenizer, WhitespaceAndCaseNormalisation) {
    const auto tok = tiny(kDecoderTokenizer);
    EXPECT_EQ(tok.encode("  A\tPHOTO \n\n of  Two   DOGS  "), tok.encode("a photo of two dogs"));
    // NFC: "e" + combining acute equals the precomposed "é".
    EXPECT_EQ(tok.encode("cafe\xCC\x81"), tok.encode("caf\xC3\xA9"));
    EXPECT_EQ(tok.encode(""), (std::vector<int64_t>{tok.bos_token_id(), tok.eos_token_id()}));
    // Contractions are separate pieces; special tokens in the text are kept as one id.
    EXPECT_EQ(tok.encode("dog's"), tok.encode("dog 's"));
    const auto with_special = tok.encode("a<|endoftext|>b");
    EXPECT_EQ(with_special.size(), 5u);
    EXPECT_EQ(with_special[2], tok.eos_token_id());
}

TEST(CLIPTokenizer, TruncationKeepsBosAndEos) {
    const auto tok = tiny(kPriorTokenizer);
    std::string text;
    for (int i = 0; i < 40; ++i) text += "a very long prompt ";
    ASSERT_GT(tok.encode(text).size(), 77u);
    const auto enc = tok({text});
    ASSERT_EQ(enc.input_ids.sizes(), (std::vector<int64_t>{1, 77}));
    EXPECT_EQ(enc.input_ids[0][0].item<int64_t>(), tok.bos_token_id());
    EXPECT_EQ(enc.input_ids[0][76].item<int64_t>(), tok.eos_token_id());
    EXPECT_EQ(enc.attention_mask.sum().item<int64_t>(), 77);
    const auto full = tok.encode(text);
    for (int64_t k = 1; k < 76; ++k)
        EXPECT_EQ(enc.input_ids[0][k].item<int64_t>(), full[static_cast<size_t>(k)]);

    TokenizerOptions short_options;
    short_options.max_length = 10;
    const auto cut = tok({text}, short_options);
    ASSERT_EQ(cut.input_ids.sizes(), (std::vector<int64_t>{1, 10}));
    EXPECT_EQ(cut.input_ids[0][9].item<int64_t>(), tok.eos_token_id());

    TokenizerOptions no_truncation;
    no_truncation.truncation = false;
    const auto whole = tok({text, "horse"}, no_truncation);
    EXPECT_EQ(whole.input_ids.size(1), static_cast<int64_t>(full.size()));
}

// With truncation only the kept ids are encoded: the same rows as encoding all and cutting.
TEST(CLIPTokenizer, TruncationStopsEncodingAtTheLimit) {
    const auto tok = tiny(kPriorTokenizer);
    std::string text;
    for (int i = 0; i < 30; ++i) text += "horse fire ";
    text += std::string(200000, 'a') + " fighter";  // a long last piece, cut away entirely
    const auto full = tok.encode(text);
    for (const int max_length : {2, 3, 10, 77}) {
        TokenizerOptions options;
        options.max_length = max_length;
        const auto enc = tok({text, "horse"}, options);
        ASSERT_EQ(enc.input_ids.sizes(), (std::vector<int64_t>{2, max_length}));
        std::vector<int64_t> expected(full.begin(), full.begin() + max_length - 1);
        expected.push_back(tok.eos_token_id());
        const auto row = enc.input_ids[0].contiguous();
        EXPECT_EQ(
            std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + max_length),
            expected)
            << "max_length " << max_length;
    }
}

TEST(CLIPTokenizer, RejectsMaxLengthWithoutRoomForSpecials) {
    const auto tok = tiny(kPriorTokenizer);
    for (const int max_length : {1, 0, -5}) {
        TokenizerOptions options;
        options.max_length = max_length;
        WUERSTCHEN_EXPECT_THROW_MSG(tok({"horse"}, options), InvalidArgument, "`max_length`",
                                    std::to_string(max_length));
    }
    // Without truncation max_length only sets the padded length: 1 is fine.
    TokenizerOptions padding_only;
    padding_only.truncation = false;
    padding_only.max_length = 1;
    EXPECT_EQ(tok({"horse"}, padding_only).input_ids.size(1),
              static_cast<int64_t>(tok.encode("horse").size()));
}

// CLIP's merge loop as the reference writes it: while a neighbouring pair has a merge, merge
// every occurrence of the lowest-ranked one, left to right. For words of lower-case ASCII
// letters (which byte-level BPE maps to themselves, and pre-tokenisation keeps as one piece).
std::vector<int64_t> reference_bpe(const std::string& word,
                                   const std::map<std::pair<std::string, std::string>, int>& ranks,
                                   const nlohmann::json& vocab, int64_t unk) {
    std::vector<std::string> symbols;
    for (const char c : word) symbols.emplace_back(1, c);
    symbols.back() += "</w>";
    while (symbols.size() > 1) {
        int best = std::numeric_limits<int>::max();
        std::pair<std::string, std::string> pair;
        for (size_t k = 0; k + 1 < symbols.size(); ++k) {
            const auto it = ranks.find({symbols[k], symbols[k + 1]});
            if (it != ranks.end() && it->second < best) {
                best = it->second;
                pair = it->first;
            }
        }
        if (best == std::numeric_limits<int>::max()) break;
        std::vector<std::string> merged;
        for (size_t k = 0; k < symbols.size(); ++k) {
            if (k + 1 < symbols.size() && symbols[k] == pair.first &&
                symbols[k + 1] == pair.second) {
                merged.push_back(pair.first + pair.second);
                ++k;
            } else {
                merged.push_back(symbols[k]);
            }
        }
        symbols.swap(merged);
    }
    std::vector<int64_t> ids;
    for (const auto& s : symbols)
        ids.push_back(vocab.contains(s) ? vocab.at(s).get<int64_t>() : unk);
    return ids;
}

// The tokenizer's heap-ordered merges give the reference loop's ids on random words (short,
// long, repetitive), with the tiny vocabulary and, when present, the real one.
TEST(CLIPTokenizer, BpeMatchesTheReferenceMergeLoop) {
    std::vector<std::string> folders = {test::data_path(kPriorTokenizer)};
    const std::string real = test::shared_path("clip-bpe");
    if (test::file_exists(real + "/vocab.json") && test::file_exists(real + "/merges.txt"))
        folders.push_back(legacy_folder(real, "!"));
    else
        std::cout << "[ skipped  ] the real CLIP vocabulary is not at " << real << "\n";
    for (const auto& dir : folders) {
        const auto tok = CLIPTokenizer::from_pretrained(dir);
        const auto vocab = nlohmann::json::parse(read_text_file(dir + "/vocab.json"));
        std::map<std::pair<std::string, std::string>, int> ranks;
        std::istringstream merges(read_text_file(dir + "/merges.txt"));
        for (std::string line; std::getline(merges, line);) {
            if (line.empty() || line.rfind("#version", 0) == 0) continue;
            const auto space = line.find(' ');
            ranks.emplace(std::make_pair(line.substr(0, space), line.substr(space + 1)),
                          static_cast<int>(ranks.size()));
        }
        std::mt19937 rng(7);
        const std::string common = "etaoinshrdlucmfwyp";  // frequent letters make many merges
        std::vector<std::string> words = {"a", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababab",
                                          "thethethethe", "horsehorsehorse"};
        for (int i = 0; i < 300; ++i) {
            const size_t length = i < 290 ? 1 + rng() % 24 : 200 + rng() % 800;
            std::string word;
            for (size_t k = 0; k < length; ++k)
                word +=
                    rng() % 4 ? common[rng() % common.size()] : static_cast<char>('a' + rng() % 26);
            words.push_back(word);
        }
        size_t checked = 0;
        for (const auto& word : words) {
            std::vector<int64_t> expected = {tok.bos_token_id()};
            const auto body = reference_bpe(word, ranks, vocab, tok.unk_token_id());
            expected.insert(expected.end(), body.begin(), body.end());
            expected.push_back(tok.eos_token_id());
            EXPECT_EQ(tok.encode(word), expected) << dir << ": " << word;
            checked += body.size();
        }
        std::cout << "[ bpe ] " << dir << ": " << words.size() << " words, " << checked
                  << " tokens, all as the reference loop\n";
        if (dir != folders.front()) test::remove_tree(dir);
    }
}

TEST(CLIPTokenizer, BatchShapesAndPadding) {
    const auto tok = tiny(kDecoderTokenizer);
    const std::vector<std::string> texts = {"horse", "an image of a shiba inu"};
    const auto padded = tok(texts);
    EXPECT_EQ(padded.input_ids.sizes(), (std::vector<int64_t>{2, 77}));
    EXPECT_EQ(padded.attention_mask.sizes(), (std::vector<int64_t>{2, 77}));
    EXPECT_EQ(padded.input_ids.scalar_type(), torch::kInt64);
    EXPECT_EQ(padded.attention_mask.scalar_type(), torch::kInt64);

    TokenizerOptions longest;
    longest.pad_to_max = false;
    const auto enc = tok(texts, longest);
    const auto n0 = static_cast<int64_t>(tok.encode(texts[0]).size());
    const auto n1 = static_cast<int64_t>(tok.encode(texts[1]).size());
    ASSERT_EQ(enc.input_ids.sizes(), (std::vector<int64_t>{2, std::max(n0, n1)}));
    EXPECT_EQ(enc.attention_mask[0].sum().item<int64_t>(), n0);
    EXPECT_EQ(enc.attention_mask[1].sum().item<int64_t>(), n1);
    for (int64_t k = n0; k < enc.input_ids.size(1); ++k)
        EXPECT_EQ(enc.input_ids[0][k].item<int64_t>(), tok.pad_token_id());
    EXPECT_TRUE(torch::equal(enc.input_ids, padded.input_ids.slice(1, 0, enc.input_ids.size(1))));
    EXPECT_EQ(tok({}).input_ids.size(0), 0);
}

TEST(CLIPTokenizer, CopyAndMove) {
    auto tok = tiny(kPriorTokenizer);
    const CLIPTokenizer copy = tok;
    CLIPTokenizer moved = std::move(tok);
    EXPECT_EQ(copy.encode("horse"), moved.encode("horse"));
    // NOLINTNEXTLINE(bugprone-use-after-move): a moved-from tokenizer says so, it does not crash
    WUERSTCHEN_EXPECT_THROW_MSG(tok.encode("horse"), InvalidArgument, "moved from");
}

TEST(CLIPTokenizer, ErrorFolderWithoutVocabulary) {
    const std::string dir = test::make_temp_dir("clip_tok_empty_");
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError, dir,
                                "no tokenizer vocabulary");
    test::remove_tree(dir);
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError, dir);
}

TEST(CLIPTokenizer, ErrorMalformedFiles) {
    const std::string src = test::data_path(kPriorTokenizer);
    const std::string dir = test::make_temp_dir("clip_tok_bad_");
    test::write_file(dir + "/vocab.json", "{\"a\": 0, ");
    test::write_file(dir + "/merges.txt", read_text_file(src + "/merges.txt"));
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError,
                                dir + "/vocab.json", "invalid JSON");

    test::write_file(dir + "/vocab.json", read_text_file(src + "/vocab.json"));
    test::write_file(dir + "/merges.txt", "#version: 0.2\ni n\nthis is three\n");
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError,
                                dir + "/merges.txt", "line 3", "this is three");

    test::write_file(dir + "/merges.txt", read_text_file(src + "/merges.txt"));
    test::write_file(dir + "/special_tokens_map.json", "{\"pad_token\": \"<|nope|>\"}");
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError, dir,
                                "pad_token", "<|nope|>");

    std::remove((dir + "/vocab.json").c_str());
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError, dir,
                                "no tokenizer vocabulary");
    test::write_file(dir + "/tokenizer.json", "[1, 2");
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTokenizer::from_pretrained(dir), TokenizerError,
                                dir + "/tokenizer.json", "invalid JSON");
    test::remove_tree(dir);
}

}  // namespace
}  // namespace wuerstchen
