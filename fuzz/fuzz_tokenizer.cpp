// libFuzzer target: the CLIP tokenizer on arbitrary text, with both tiny test tokenizers (legacy
// vocab.json + merges.txt, and tokenizer.json). encode, the batch call under several option sets
// and decode (of the encoding, and of arbitrary ids) must never crash, and the batch output must
// keep its documented shape. No exception is expected for any text.

#include <torch/types.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/error.h"

#ifndef WUERSTCHEN_TEST_DATA
#error "WUERSTCHEN_TEST_DATA must name tests/data"
#endif

namespace {

[[noreturn]] void finding(const std::string& what) {
    std::fprintf(stderr, "fuzz_tokenizer: %s\n", what.c_str());
    std::abort();
}

std::vector<wuerstchen::CLIPTokenizer>& tokenizers() {
    static std::vector<wuerstchen::CLIPTokenizer> all = [] {
        std::vector<wuerstchen::CLIPTokenizer> v;
        v.push_back(wuerstchen::CLIPTokenizer::from_pretrained(WUERSTCHEN_TEST_DATA
                                                               "/tiny-wuerstchen-prior/tokenizer"));
        v.push_back(wuerstchen::CLIPTokenizer::from_pretrained(WUERSTCHEN_TEST_DATA
                                                               "/tiny-wuerstchen/tokenizer"));
        return v;
    }();
    return all;
}

void check(const wuerstchen::CLIPTokenizer& tok, const std::string& text, const uint8_t* data,
           size_t size) {
    const std::vector<int64_t> ids = tok.encode(text);
    if (ids.size() < 2 || ids.front() != tok.bos_token_id() || ids.back() != tok.eos_token_id())
        finding("encode did not produce bos ... eos");
    (void)tok.decode(ids);

    // Arbitrary ids (negative, huge, in range) taken from the input bytes.
    std::vector<int64_t> raw;
    for (size_t i = 0; i + 2 <= size && raw.size() < 64; i += 2) {
        const int16_t v = static_cast<int16_t>(data[i] | (data[i + 1] << 8));
        raw.push_back(v % 2 == 0 ? v : static_cast<int64_t>(v) * 1000003);
    }
    (void)tok.decode(raw);

    // Batch call: option sets chosen by the first byte, the text and a suffix of it.
    const uint8_t sel = size ? data[0] : 0;
    wuerstchen::TokenizerOptions options;
    options.max_length = (sel & 0x0f) == 0 ? -1 : (sel & 0x0f);
    options.truncation = (sel & 0x10) == 0;
    options.pad_to_max = (sel & 0x20) == 0;
    const std::vector<std::string> texts{text, text.substr(text.size() / 2)};
    if (options.truncation && options.max_length == 1) {  // no room for bos and eos: refused
        try {
            (void)tok(texts, options);
        } catch (const wuerstchen::InvalidArgument&) {
            return;
        }
        finding("max_length 1 with truncation was accepted");
    }
    const auto batch = tok(texts, options);
    const int64_t max_length = options.max_length > 0 ? options.max_length : tok.model_max_length();
    if (batch.input_ids.dim() != 2 || batch.input_ids.size(0) != 2 ||
        batch.input_ids.sizes() != batch.attention_mask.sizes())
        finding("batch has the wrong shape");
    if (options.truncation && options.pad_to_max &&
        batch.input_ids.size(1) != std::max<int64_t>(max_length, 2))
        finding("truncated + padded batch is not max_length wide");
    if (options.truncation && batch.input_ids.size(1) > std::max<int64_t>(max_length, 2))
        finding("truncated batch is wider than max_length");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    tokenizers();
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    for (const auto& tok : tokenizers()) check(tok, text, data, size);
    return 0;
}
