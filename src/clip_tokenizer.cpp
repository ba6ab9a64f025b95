#include "wuerstchen/clip_tokenizer.h"

#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <system_error>
#include <unordered_map>
#include <utility>

#include "json_util.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"

namespace wuerstchen {

namespace {

namespace fs = std::filesystem;

constexpr int kDefaultMaxLength = 77;
// transformers stores VERY_LARGE_INTEGER (1e30) when the checkpoint names no limit.
constexpr double kHugeMaxLength = 1e6;
constexpr int32_t kReplacementChar = 0xFFFD;

// ------------------------------------------------------------------ UTF-8 helpers

void append_utf8(std::string& out, int32_t cp) {
    utf8proc_uint8_t buf[4];
    const auto n = utf8proc_encode_char(cp, buf);
    out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

// Code points of `text`; each invalid byte becomes U+FFFD (Python's errors="replace").
std::vector<int32_t> decode_utf8(const std::string& text) {
    std::vector<int32_t> cps;
    cps.reserve(text.size());
    const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(text.data());
    utf8proc_ssize_t left = static_cast<utf8proc_ssize_t>(text.size());
    while (left > 0) {
        utf8proc_int32_t cp = -1;
        const auto n = utf8proc_iterate(p, left, &cp);
        if (n <= 0 || cp < 0) {
            cps.push_back(kReplacementChar);
            ++p;
            --left;
            continue;
        }
        cps.push_back(cp);
        p += n;
        left -= n;
    }
    return cps;
}

std::string encode_utf8(const std::vector<int32_t>& cps) {
    std::string out;
    out.reserve(cps.size());
    for (const int32_t cp : cps) append_utf8(out, cp);
    return out;
}

std::vector<int32_t> nfc(const std::vector<int32_t>& cps) {
    const std::string text = encode_utf8(cps);
    utf8proc_uint8_t* out = nullptr;
    const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                static_cast<utf8proc_ssize_t>(text.size()), &out,
                                static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n < 0) return cps;  // cannot happen for valid input; keep the text as it is
    std::string composed(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
    std::free(out);
    return decode_utf8(composed);
}

// Unicode White_Space, which is what `\s` matches in the Oniguruma patterns of tokenizer.json.
bool is_space(int32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

bool is_letter(int32_t cp) {
    switch (utf8proc_category(cp)) {
        case UTF8PROC_CATEGORY_LU:
        case UTF8PROC_CATEGORY_LL:
        case UTF8PROC_CATEGORY_LT:
        case UTF8PROC_CATEGORY_LM:
        case UTF8PROC_CATEGORY_LO:
            return true;
        default:
            return false;
    }
}

bool is_number(int32_t cp) {
    switch (utf8proc_category(cp)) {
        case UTF8PROC_CATEGORY_ND:
        case UTF8PROC_CATEGORY_NL:
        case UTF8PROC_CATEGORY_NO:
            return true;
        default:
            return false;
    }
}

// The normalizer of HF's CLIP tokenizer (tokenizers backend, which transformers 5 uses for
// CLIPTokenizer): NFC, every run of whitespace -> one space, lower case. Lower case is
// per character like Rust's char::to_lowercase (no final-sigma rule; U+0130 -> "i\u0307").
// There is no strip and no HTML unescaping: "&amp;" stays three pieces.
std::vector<int32_t> normalize(const std::vector<int32_t>& input) {
    const std::vector<int32_t> composed = nfc(input);
    std::vector<int32_t> out;
    out.reserve(composed.size());
    bool in_space = false;
    for (const int32_t cp : composed) {
        if (is_space(cp)) {
            if (!in_space) out.push_back(' ');
            in_space = true;
            continue;
        }
        in_space = false;
        if (cp == 0x130) {
            out.push_back('i');
            out.push_back(0x307);
        } else {
            out.push_back(utf8proc_tolower(cp));
        }
    }
    return out;
}

bool starts_with_at(const std::vector<int32_t>& cps, size_t pos, const char* ascii) {
    for (size_t k = 0; ascii[k] != '\0'; ++k) {
        if (pos + k >= cps.size() || cps[pos + k] != static_cast<unsigned char>(ascii[k]))
            return false;
    }
    return true;
}

// CLIP's pre-tokenizer pattern, tried alternative by alternative at each position like the regex:
//   <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
// Whitespace is not matched, so it separates pieces and disappears.
std::vector<std::string> split_pieces(const std::vector<int32_t>& cps) {
    static const char* const kLiterals[] = {
        "<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    std::vector<std::string> pieces;
    size_t i = 0;
    while (i < cps.size()) {
        const int32_t cp = cps[i];
        if (is_space(cp)) {
            ++i;
            continue;
        }
        size_t end = i;
        for (const char* lit : kLiterals) {
            if (starts_with_at(cps, i, lit)) {
                end = i + std::char_traits<char>::length(lit);
                break;
            }
        }
        if (end == i) {
            if (is_letter(cp)) {
                end = i + 1;
                while (end < cps.size() && is_letter(cps[end])) ++end;
            } else if (is_number(cp)) {
                end = i + 1;
            } else {
                end = i + 1;
                while (end < cps.size() && !is_space(cps[end]) && !is_letter(cps[end]) &&
                       !is_number(cps[end]))
                    ++end;
            }
        }
        pieces.push_back(encode_utf8(std::vector<int32_t>(cps.begin() + static_cast<long>(i),
                                                          cps.begin() + static_cast<long>(end))));
        i = end;
    }
    return pieces;
}

// GPT-2's reversible byte -> printable character table.
std::array<int32_t, 256> byte_to_unicode_table() {
    std::array<int32_t, 256> table{};
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    int next = 0;
    for (int b = 0; b < 256; ++b) table[b] = direct[b] ? b : 256 + next++;
    return table;
}

// ------------------------------------------------------------------ file helpers

nlohmann::json parse_json_file(const std::string& path) {
    std::string text;
    try {
        text = read_text_file(path);
    } catch (const Error& e) {
        throw TokenizerError(path + ": cannot read: " + e.what());
    }
    if (detail::json_too_deep(text.data(), text.data() + text.size()))
        throw TokenizerError(path + ": invalid JSON: nested deeper than " +
                             std::to_string(detail::kMaxJsonDepth) + " levels");
    try {
        return nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        throw TokenizerError(path + ": invalid JSON: " + e.what());
    }
}

// A special token in tokenizer_config.json / special_tokens_map.json: a string or an AddedToken
// object {"content": ...}. Returns false when absent or null.
bool token_string(const nlohmann::json& object, const std::string& key, const std::string& source,
                  std::string& out) {
    if (!object.is_object() || !object.contains(key) || object.at(key).is_null()) return false;
    const auto& v = object.at(key);
    if (v.is_string()) {
        out = v.get<std::string>();
        return true;
    }
    if (v.is_object() && v.contains("content") && v.at("content").is_string()) {
        out = v.at("content").get<std::string>();
        return true;
    }
    throw TokenizerError(source + ": '" + key + "' must be a string or an object with 'content'");
}

}  // namespace

// ====================================================================== Impl

struct CLIPTokenizer::Impl {
    std::unordered_map<std::string, int64_t> vocab;
    // A map, not a vector indexed by id: ids come from the files, and one id of 10^12 must not
    // size an allocation.
    std::unordered_map<int64_t, std::string> id_to_token;
    // "first\nsecond" -> rank (byte-level tokens never contain '\n').
    std::unordered_map<std::string, int> merge_ranks;
    // Added tokens (the specials among them) are cut out of the raw text before normalisation.
    std::vector<std::pair<std::string, int64_t>> added_tokens;
    std::string end_of_word_suffix = "</w>";
    std::array<std::string, 256> byte_encoder;
    std::unordered_map<int32_t, unsigned char> byte_decoder;
    int64_t bos_id = 0, eos_id = 0, pad_id = 0, unk_id = 0;
    int max_length = kDefaultMaxLength;
    size_t size = 0;
    int64_t max_id = 0;  // the largest id encoding can give

    void init_bytes() {
        const auto table = byte_to_unicode_table();
        for (int b = 0; b < 256; ++b) {
            byte_encoder[b].clear();
            append_utf8(byte_encoder[b], table[b]);
            byte_decoder[table[b]] = static_cast<unsigned char>(b);
        }
    }

    void add_merge(const std::string& a, const std::string& b, const std::string& source,
                   const std::string& where) {
        for (const std::string* part : {&a, &b}) {
            if (!vocab.count(*part))
                throw TokenizerError(source + ": " + where + ": merge token '" + *part +
                                     "' is not in the vocabulary");
        }
        if (!vocab.count(a + b))
            throw TokenizerError(source + ": " + where + ": merged token '" + a + b +
                                 "' is not in the vocabulary");
        const std::string key = a + "\n" + b;
        if (!merge_ranks.count(key)) merge_ranks.emplace(key, static_cast<int>(merge_ranks.size()));
    }

    void set_vocab(const nlohmann::json& v, const std::string& source) {
        if (!v.is_object()) throw TokenizerError(source + ": the vocabulary must be a JSON object");
        for (auto it = v.begin(); it != v.end(); ++it) {
            if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0)
                throw TokenizerError(source + ": vocabulary entry '" + it.key() +
                                     "' must map to a non-negative integer id");
            vocab[it.key()] = it.value().get<int64_t>();
        }
        if (vocab.empty()) throw TokenizerError(source + ": the vocabulary is empty");
    }

    // tokenizer_config.json "added_tokens_decoder": {"<id>": {"content": ...}, ...}
    void read_added_tokens_decoder(const nlohmann::json& config, const std::string& source) {
        if (!config.is_object() || !config.contains("added_tokens_decoder")) return;
        const auto& decoder = config.at("added_tokens_decoder");
        if (!decoder.is_object()) return;
        for (auto it = decoder.begin(); it != decoder.end(); ++it) {
            std::string content;
            if (!token_string(nlohmann::json{{"t", it.value()}}, "t", source, content)) continue;
            // The whole key must be a non-negative decimal id ("12abc" and "-1" are not).
            int64_t id = -1;
            const char* first = it.key().data();
            const char* last = first + it.key().size();
            const auto [end, ec] = std::from_chars(first, last, id);
            if (ec != std::errc() || end != last || id < 0)
                throw TokenizerError(source + ": added_tokens_decoder key '" + it.key() +
                                     "' is not an id");
            add_token(content, id, source);
        }
    }

    // Ids index the text encoder's embedding table, so they are never negative (JSON integers
    // above INT64_MAX arrive here wrapped to negative values).
    void add_token(const std::string& content, int64_t id, const std::string& source) {
        if (id < 0)
            throw TokenizerError(source + ": added token '" + content + "' has negative id " +
                                 std::to_string(id));
        for (const auto& t : added_tokens)
            if (t.first == content) return;
        added_tokens.emplace_back(content, id);
    }

    int64_t special_id(const std::string& name, const std::string& content,
                       const std::string& source) const {
        const auto it = vocab.find(content);
        if (it != vocab.end()) return it->second;
        for (const auto& t : added_tokens)
            if (t.first == content) return t.second;
        throw TokenizerError(source + ": " + name + " '" + content + "' is not in the vocabulary");
    }

    void finish(const std::string& dir, const std::string& bos, const std::string& eos,
                const std::string& pad, const std::string& unk) {
        bos_id = special_id("bos_token", bos, dir);
        eos_id = special_id("eos_token", eos, dir);
        pad_id = special_id("pad_token", pad, dir);
        unk_id = special_id("unk_token", unk, dir);
        for (const auto& [content, id] : {std::make_pair(bos, bos_id), std::make_pair(eos, eos_id),
                                          std::make_pair(unk, unk_id), std::make_pair(pad, pad_id)})
            add_token(content, id, dir);
        // Leftmost-longest matching: try longer tokens first at each position.
        std::stable_sort(
            added_tokens.begin(), added_tokens.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
        added_tokens.erase(std::remove_if(added_tokens.begin(), added_tokens.end(),
                                          [](const auto& t) { return t.first.empty(); }),
                           added_tokens.end());
        id_to_token.clear();
        for (const auto& [tok, id] : vocab) id_to_token[id] = tok;
        for (const auto& [tok, id] : added_tokens) id_to_token[id] = tok;
        size = vocab.size();
        for (const auto& t : added_tokens)
            if (!vocab.count(t.first)) ++size;
        max_id = std::max({bos_id, eos_id, pad_id, unk_id});
        for (const auto& [tok, id] : vocab) max_id = std::max(max_id, id);
        for (const auto& [tok, id] : added_tokens) max_id = std::max(max_id, id);
    }

    // Rank of the merge of symbols a and b, or -1.
    int merge_rank(const std::string& a, const std::string& b) const {
        const auto it = merge_ranks.find(a + "\n" + b);
        return it != merge_ranks.end() ? it->second : -1;
    }

    // Byte-level BPE of one pre-tokenized piece; the last symbol carries the end-of-word suffix.
    // As CLIP's bpe(): while any neighbouring pair has a merge, take the lowest-ranked pair and
    // merge each of its occurrences, left to right, without overlap. Candidate pairs wait in a
    // heap ordered by (rank, position), so a pass pops exactly that pair's occurrences in order;
    // pairs made by a pass join the heap after it, and entries whose symbols have changed since
    // are dropped when popped. O(n log n) in the piece's length, where rescanning every pair
    // after each merge (the reference's way) is quadratic, which a long run of letters (one
    // piece) would make take minutes.
    void bpe(const std::string& piece, std::vector<int64_t>& ids) const {
        const size_t n = piece.size();
        if (n == 0) return;
        std::vector<std::string> symbol(n);
        std::vector<size_t> next(n), prev(n);
        constexpr size_t kNone = std::numeric_limits<size_t>::max();
        for (size_t k = 0; k < n; ++k) {
            symbol[k] = byte_encoder[static_cast<unsigned char>(piece[k])];
            prev[k] = k == 0 ? kNone : k - 1;
            next[k] = k + 1 == n ? kNone : k + 1;
        }
        symbol.back() += end_of_word_suffix;
        using Candidate = std::pair<int, size_t>;  // (rank, position of the pair's left symbol)
        std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
        std::vector<bool> merged_away(n, false);
        auto push_pair = [&](size_t k) {
            if (k == kNone || merged_away[k] || next[k] == kNone) return;
            const int rank = merge_rank(symbol[k], symbol[next[k]]);
            if (rank >= 0) heap.emplace(rank, k);
        };
        for (size_t k = 0; k + 1 < n; ++k) push_pair(k);
        std::vector<size_t> touched;
        while (!heap.empty()) {
            const int rank = heap.top().first;
            touched.clear();
            while (!heap.empty() && heap.top().first == rank) {
                const size_t k = heap.top().second;
                heap.pop();
                if (merged_away[k] || next[k] == kNone ||
                    merge_rank(symbol[k], symbol[next[k]]) != rank)
                    continue;  // the pair changed since it was queued
                const size_t right = next[k];
                symbol[k] += symbol[right];
                symbol[right].clear();
                merged_away[right] = true;
                next[k] = next[right];
                if (next[right] != kNone) prev[next[right]] = k;
                touched.push_back(prev[k]);
                touched.push_back(k);
            }
            std::sort(touched.begin(), touched.end());
            touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
            for (const size_t k : touched) push_pair(k);
        }
        for (size_t k = 0; k != kNone; k = next[k]) {
            const auto it = vocab.find(symbol[k]);
            ids.push_back(it != vocab.end() ? it->second : unk_id);
        }
    }

    // Pieces are encoded independently and in order, so the first `limit` ids do not depend on
    // the text after them: encoding stops once there are that many.
    void encode_segment(const std::string& segment, std::vector<int64_t>& ids, size_t limit) const {
        if (segment.empty()) return;
        for (const auto& piece : split_pieces(normalize(decode_utf8(segment)))) {
            if (ids.size() >= limit) return;
            bpe(piece, ids);
        }
    }

    // The ids of `text` without bos and eos; at least the first `limit` of them (more when the
    // last piece encoded runs past it).
    std::vector<int64_t> encode_body(const std::string& text,
                                     size_t limit = std::numeric_limits<size_t>::max()) const {
        std::vector<int64_t> ids;
        size_t start = 0;
        for (size_t pos = 0; pos < text.size() && ids.size() < limit;) {
            const std::pair<std::string, int64_t>* hit = nullptr;
            for (const auto& t : added_tokens) {
                if (text.compare(pos, t.first.size(), t.first) == 0) {
                    hit = &t;
                    break;
                }
            }
            if (hit == nullptr) {
                ++pos;
                continue;
            }
            encode_segment(text.substr(start, pos - start), ids, limit);
            if (ids.size() >= limit) return ids;
            ids.push_back(hit->second);
            pos += hit->first.size();
            start = pos;
        }
        if (ids.size() < limit) encode_segment(text.substr(start), ids, limit);
        return ids;
    }

    // bos, the body's ids (at least its first `limit`), eos.
    std::vector<int64_t> encode_with_specials(
        const std::string& text, size_t limit = std::numeric_limits<size_t>::max()) const {
        std::vector<int64_t> ids{bos_id};
        const auto body = encode_body(text, limit);
        ids.insert(ids.end(), body.begin(), body.end());
        ids.push_back(eos_id);
        return ids;
    }
};

// ====================================================================== loading

namespace {

struct SpecialNames {
    std::string bos = "<|startoftext|>";
    std::string eos = "<|endoftext|>";
    std::string pad = "<|endoftext|>";
    std::string unk = "<|endoftext|>";
};

void read_special_names(const nlohmann::json& object, const std::string& source,
                        SpecialNames& names) {
    if (!object.is_object()) throw TokenizerError(source + ": expected a JSON object");
    token_string(object, "bos_token", source, names.bos);
    token_string(object, "eos_token", source, names.eos);
    token_string(object, "pad_token", source, names.pad);
    token_string(object, "unk_token", source, names.unk);
}

int read_max_length(const nlohmann::json& config) {
    if (!config.is_object() || !config.contains("model_max_length")) return kDefaultMaxLength;
    const auto& v = config.at("model_max_length");
    if (!v.is_number()) return kDefaultMaxLength;
    const double d = v.get<double>();
    if (!(d >= 1) || d > kHugeMaxLength) return kDefaultMaxLength;
    return static_cast<int>(d);
}

}  // namespace

CLIPTokenizer CLIPTokenizer::from_pretrained(const std::string& dir) {
    auto impl = std::make_unique<Impl>();
    impl->init_bytes();
    const fs::path root(dir);
    const std::string tokenizer_json = (root / "tokenizer.json").string();
    const std::string vocab_json = (root / "vocab.json").string();
    const std::string merges_txt = (root / "merges.txt").string();
    const std::string config_json = (root / "tokenizer_config.json").string();
    const std::string special_json = (root / "special_tokens_map.json").string();
    const std::string added_json = (root / "added_tokens.json").string();

    std::error_code ec;
    if (!fs::is_directory(root, ec))
        throw TokenizerError(dir + ": tokenizer folder does not exist");

    SpecialNames names;
    nlohmann::json config = nlohmann::json::object();
    if (fs::exists(config_json, ec)) {
        config = parse_json_file(config_json);
        read_special_names(config, config_json, names);
        impl->max_length = read_max_length(config);
        impl->read_added_tokens_decoder(config, config_json);
    }

    if (fs::exists(tokenizer_json, ec)) {
        // Modern layout: everything in tokenizer.json (tokenizers' serialisation).
        const nlohmann::json tj = parse_json_file(tokenizer_json);
        if (!tj.is_object() || !tj.contains("model") || !tj.at("model").is_object())
            throw TokenizerError(tokenizer_json + ": no 'model' object");
        const auto& model = tj.at("model");
        if (model.contains("type") && model.at("type") != "BPE")
            throw TokenizerError(tokenizer_json + ": model type " + model.at("type").dump() +
                                 " is not BPE");
        if (!model.contains("vocab"))
            throw TokenizerError(tokenizer_json + ": model has no 'vocab'");
        impl->set_vocab(model.at("vocab"), tokenizer_json);
        if (model.contains("end_of_word_suffix") && model.at("end_of_word_suffix").is_string())
            impl->end_of_word_suffix = model.at("end_of_word_suffix").get<std::string>();
        if (!config.contains("unk_token") && model.contains("unk_token") &&
            model.at("unk_token").is_string())
            names.unk = model.at("unk_token").get<std::string>();
        const auto merges = model.contains("merges") ? model.at("merges") : nlohmann::json::array();
        if (!merges.is_array()) throw TokenizerError(tokenizer_json + ": 'merges' must be a list");
        for (size_t k = 0; k < merges.size(); ++k) {
            const auto& m = merges[k];
            const std::string where = "merge " + std::to_string(k);
            if (m.is_string()) {
                const std::string s = m.get<std::string>();
                const auto space = s.find(' ');
                if (space == std::string::npos || space == 0 || space + 1 >= s.size() ||
                    s.find(' ', space + 1) != std::string::npos)
                    throw TokenizerError(tokenizer_json + ": " + where + " '" + s +
                                         "' is not two tokens separated by a space");
                impl->add_merge(s.substr(0, space), s.substr(space + 1), tokenizer_json, where);
            } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
                impl->add_merge(m[0].get<std::string>(), m[1].get<std::string>(), tokenizer_json,
                                where);
            } else {
                throw TokenizerError(tokenizer_json + ": " + where + " " + m.dump() +
                                     " is not a pair of tokens");
            }
        }
        if (tj.contains("added_tokens") && tj.at("added_tokens").is_array()) {
            for (const auto& t : tj.at("added_tokens")) {
                if (!t.is_object() || !t.contains("content") || !t.contains("id") ||
                    !t.at("content").is_string() || !t.at("id").is_number_integer())
                    throw TokenizerError(tokenizer_json +
                                         ": malformed entry in 'added_tokens': " + t.dump());
                impl->add_token(t.at("content").get<std::string>(), t.at("id").get<int64_t>(),
                                tokenizer_json);
            }
        }
    } else if (fs::exists(vocab_json, ec)) {
        // Legacy layout: vocab.json + merges.txt (+ special_tokens_map.json).
        impl->set_vocab(parse_json_file(vocab_json), vocab_json);
        if (!fs::exists(merges_txt, ec))
            throw TokenizerError(dir + ": vocab.json without merges.txt");
        std::string text;
        try {
            text = read_text_file(merges_txt);
        } catch (const Error& e) {
            throw TokenizerError(merges_txt + ": cannot read: " + e.what());
        }
        std::istringstream lines(text);
        std::string line;
        for (size_t number = 1; std::getline(lines, line); ++number) {
            if (!line.empty() && line.back() == '\r') line.pop_back();
            if (line.empty() || (number == 1 && line.rfind("#version", 0) == 0)) continue;
            const auto space = line.find(' ');
            const std::string where = "line " + std::to_string(number);
            if (space == std::string::npos || space == 0 || space + 1 >= line.size() ||
                line.find(' ', space + 1) != std::string::npos)
                throw TokenizerError(merges_txt + ": " + where + " '" + line +
                                     "' is not two tokens separated by a space");
            impl->add_merge(line.substr(0, space), line.substr(space + 1), merges_txt, where);
        }
        if (fs::exists(added_json, ec)) {
            const auto added = parse_json_file(added_json);
            if (!added.is_object()) throw TokenizerError(added_json + ": expected a JSON object");
            for (auto it = added.begin(); it != added.end(); ++it) {
                if (!it.value().is_number_integer())
                    throw TokenizerError(added_json + ": '" + it.key() + "' must map to an id");
                impl->add_token(it.key(), it.value().get<int64_t>(), added_json);
            }
        }
    } else {
        throw TokenizerError(dir +
                             ": no tokenizer vocabulary (expected tokenizer.json or vocab.json + "
                             "merges.txt)");
    }

    // special_tokens_map.json overrides tokenizer_config.json, as in transformers.
    if (fs::exists(special_json, ec))
        read_special_names(parse_json_file(special_json), special_json, names);

    impl->finish(dir, names.bos, names.eos, names.pad, names.unk);
    return CLIPTokenizer(std::move(impl));
}

// ====================================================================== encoding

std::vector<int64_t> CLIPTokenizer::encode(const std::string& text) const {
    return impl().encode_with_specials(text);
}

BatchEncoding CLIPTokenizer::operator()(const std::vector<std::string>& texts,
                                        const TokenizerOptions& options) const {
    // Truncation keeps bos and eos, so it needs room for both.
    const int shortest = options.truncation ? 2 : 1;
    if (options.max_length != -1 && options.max_length < shortest)
        throw InvalidArgument("CLIPTokenizer: `max_length` must be -1 (the model's " +
                              std::to_string(impl().max_length) + ") or at least " +
                              std::to_string(shortest) +
                              (options.truncation ? " (room for bos and eos)" : "") + ", got " +
                              std::to_string(options.max_length));
    const int64_t max_length = options.max_length > 0 ? options.max_length : impl().max_length;
    std::vector<std::vector<int64_t>> rows;
    rows.reserve(texts.size());
    int64_t longest = 0;
    // With truncation, tokenizers reserves room for the two specials, keeps the first
    // max_length - 2 body ids, then appends the specials again; no later id is encoded.
    const size_t keep = options.truncation ? static_cast<size_t>(max_length - 2)
                                           : std::numeric_limits<size_t>::max();
    for (const auto& text : texts) {
        auto ids = impl().encode_with_specials(text, keep);
        if (options.truncation && ids.size() - 2 > keep)
            ids.erase(ids.begin() + 1 + static_cast<std::ptrdiff_t>(keep), ids.end() - 1);
        longest = std::max<int64_t>(longest, static_cast<int64_t>(ids.size()));
        rows.push_back(std::move(ids));
    }
    const int64_t length = options.pad_to_max ? std::max(longest, max_length) : longest;
    const auto batch = static_cast<int64_t>(rows.size());
    torch::Tensor input_ids, attention_mask;
    with_memory_errors("CLIPTokenizer", [&] {  // max_length sizes them when padding
        input_ids = torch::full({batch, length}, impl().pad_id, torch::kInt64);
        attention_mask = torch::zeros({batch, length}, torch::kInt64);
        return 0;
    });
    auto ids_acc = input_ids.accessor<int64_t, 2>();
    auto mask_acc = attention_mask.accessor<int64_t, 2>();
    for (int64_t b = 0; b < batch; ++b) {
        const auto& row = rows[static_cast<size_t>(b)];
        for (size_t k = 0; k < row.size(); ++k) {
            ids_acc[b][static_cast<int64_t>(k)] = row[k];
            mask_acc[b][static_cast<int64_t>(k)] = 1;
        }
    }
    return {input_ids, attention_mask};
}

std::string CLIPTokenizer::decode(const std::vector<int64_t>& ids) const {
    std::string joined;
    for (const int64_t id : ids) {
        const auto it = impl().id_to_token.find(id);
        if (it != impl().id_to_token.end()) joined += it->second;
    }
    std::string bytes;
    for (const int32_t cp : decode_utf8(joined)) {
        const auto it = impl().byte_decoder.find(cp);
        if (it != impl().byte_decoder.end())
            bytes.push_back(static_cast<char>(it->second));
        else
            append_utf8(bytes, cp);
    }
    std::string text = encode_utf8(decode_utf8(bytes));  // invalid sequences -> U+FFFD
    const std::string& suffix = impl().end_of_word_suffix;
    if (!suffix.empty()) {
        std::string replaced;
        for (size_t pos = 0; pos < text.size();) {
            if (text.compare(pos, suffix.size(), suffix) == 0) {
                replaced += ' ';
                pos += suffix.size();
            } else {
                replaced += text[pos++];
            }
        }
        text.swap(replaced);
    }
    const auto first = text.find_first_not_of(' ');
    if (first == std::string::npos) return "";
    return text.substr(first, text.find_last_not_of(' ') - first + 1);
}

int64_t CLIPTokenizer::bos_token_id() const { return impl().bos_id; }
int64_t CLIPTokenizer::eos_token_id() const { return impl().eos_id; }
int64_t CLIPTokenizer::pad_token_id() const { return impl().pad_id; }
int64_t CLIPTokenizer::unk_token_id() const { return impl().unk_id; }
int CLIPTokenizer::model_max_length() const { return impl().max_length; }
size_t CLIPTokenizer::vocab_size() const { return impl().size; }
int64_t CLIPTokenizer::max_token_id() const { return impl().max_id; }

CLIPTokenizer::CLIPTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

const CLIPTokenizer::Impl& CLIPTokenizer::impl() const {
    if (!impl_) throw InvalidArgument("CLIPTokenizer: used after it was moved from");
    return *impl_;
}
CLIPTokenizer::CLIPTokenizer(CLIPTokenizer&&) noexcept = default;
CLIPTokenizer& CLIPTokenizer::operator=(CLIPTokenizer&&) noexcept = default;
CLIPTokenizer::CLIPTokenizer(const CLIPTokenizer& other)
    : impl_(std::make_unique<Impl>(other.impl())) {}
CLIPTokenizer& CLIPTokenizer::operator=(const CLIPTokenizer& other) {
    if (this != &other) impl_ = std::make_unique<Impl>(other.impl());
    return *this;
}
CLIPTokenizer::~CLIPTokenizer() = default;

}  // namespace wuerstchen
