#pragma once

// CLIPTokenizer with Hugging Face semantics: NFC, whitespace clean-up, lower case, CLIP's split
// pattern, byte-level BPE with "</w>" word ends, bos/eos, truncation and padding.

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace wuerstchen {

struct TokenizerOptions {
    int max_length = -1;      // -1: the tokenizer's model_max_length (77 for CLIP)
    bool truncation = true;   // cut to max_length, keeping bos and the final eos
    bool pad_to_max = true;   // pad with the pad id to max_length (else to the longest in batch)
};

struct BatchEncoding {
    torch::Tensor input_ids;       // [B, L] int64
    torch::Tensor attention_mask;  // [B, L] int64, 1 for real tokens
};

class CLIPTokenizer {
public:
    // Reads either vocab.json + merges.txt (+ special_tokens_map.json / tokenizer_config.json)
    // or tokenizer.json (+ tokenizer_config.json). Throws TokenizerError naming the folder/file.
    static CLIPTokenizer from_pretrained(const std::string& dir);

    // Token ids of one text: bos, BPE tokens, eos (no truncation or padding).
    std::vector<int64_t> encode(const std::string& text) const;
    // Batch with truncation / padding as options say.
    BatchEncoding operator()(const std::vector<std::string>& texts,
                             const TokenizerOptions& options = {}) const;
    // Inverse mapping for diagnostics (special tokens kept, "</w>" turned into spaces).
    std::string decode(const std::vector<int64_t>& ids) const;

    int64_t bos_token_id() const;
    int64_t eos_token_id() const;
    int64_t pad_token_id() const;
    int64_t unk_token_id() const;
    int model_max_length() const;
    size_t vocab_size() const;
    // The largest id it gives (vocabulary, added and special tokens): a text encoder needs a
    // larger vocab_size.
    int64_t max_token_id() const;

    CLIPTokenizer(CLIPTokenizer&&) noexcept;
    CLIPTokenizer& operator=(CLIPTokenizer&&) noexcept;
    CLIPTokenizer(const CLIPTokenizer&);
    CLIPTokenizer& operator=(const CLIPTokenizer&);
    ~CLIPTokenizer();

private:
    struct Impl;
    explicit CLIPTokenizer(std::unique_ptr<Impl> impl);
    const Impl& impl() const;  // throws InvalidArgument after a move
    std::unique_ptr<Impl> impl_;
};

}  // namespace wuerstchen
