// libFuzzer target: CLIPTokenizer::from_pretrained on a folder where one file is the fuzz
// input and the others are the tiny test tokenizer's. The first byte picks which file the rest
// of the input replaces. A malformed folder must end in a TokenizerError; a folder that loads
// must then encode and decode without crashing.


#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "scratch_dir.h"
#include "wuerstchen/clip_tokenizer.h"
#include "wuerstchen/error.h"

#ifndef WUERSTCHEN_TEST_DATA
#error "WUERSTCHEN_TEST_DATA must name tests/data"
#endif

namespace fs = std::filesystem;

namespace {

[[noreturn]] void finding(const std::string& what) {
    std::fprintf(stderr, "fuzz_tokenizer_files: %s\n", what.c_str());
    std::abort();
}

const fs::path kLegacy = WUERSTCHEN_TEST_DATA "/tiny-wuerstchen-prior/tokenizer";
const fs::path kModern = WUERSTCHEN_TEST_DATA "/tiny-wuerstchen/tokenizer";

struct Layout {
    fs::path base;         // fixture folder the other files come from
    const char* replaced;  // file the input replaces
};
const Layout kLayouts[] = {
    {kModern, "tokenizer.json"},
    {kModern, "tokenizer_config.json"},
    {kLegacy, "vocab.json"},
    {kLegacy, "merges.txt"},
    {kLegacy, "tokenizer_config.json"},
    {kLegacy, "special_tokens_map.json"},
    {kLegacy, "added_tokens.json"},
};

const fs::path& scratch() { return wuerstchen::fuzz::scratch_dir("tok"); }

void write_file(const fs::path& path, const char* data, size_t size) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(data, static_cast<std::streamsize>(size));
    if (!out) finding("cannot write " + path.string());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    const Layout& layout = kLayouts[data[0] % (sizeof(kLayouts) / sizeof(kLayouts[0]))];
    const fs::path& dir = scratch();
    for (const auto& entry : fs::directory_iterator(dir)) fs::remove(entry.path());
    for (const auto& entry : fs::directory_iterator(layout.base))
        fs::copy_file(entry.path(), dir / entry.path().filename(),
                      fs::copy_options::overwrite_existing);
    write_file(dir / layout.replaced, reinterpret_cast<const char*>(data + 1), size - 1);
    try {
        const auto tok = wuerstchen::CLIPTokenizer::from_pretrained(dir.string());
        for (const char* text : {"a photo of a cat", "<|startoftext|>hello<|endoftext|> world!",
                                 "\xc3\xa9t\xc3\xa9 2024 'll", ""}) {
            const auto ids = tok.encode(text);
            (void)tok.decode(ids);
            (void)tok({text}, {});
        }
        std::vector<int64_t> all;
        for (int64_t id = -2; id < static_cast<int64_t>(tok.vocab_size()) + 2 && id < 4096; ++id)
            all.push_back(id);
        (void)tok.decode(all);
    } catch (const wuerstchen::TokenizerError&) {
    }
    return 0;
}
