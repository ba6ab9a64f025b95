// wuerstchen: command-line front end of libwuerstchen.
//
//   wuerstchen generate --model DIR | --prior DIR --decoder DIR --prompt TEXT [options]
//   wuerstchen prior    --prior DIR --prompt TEXT --output-tensors FILE [options]
//   wuerstchen decode   --decoder DIR --embeddings FILE --output out.png [options]
//   wuerstchen tokenize --tokenizer DIR --text TEXT
//   wuerstchen info     DIR
//   wuerstchen bench    --model DIR | --prior DIR --decoder DIR | --random-weights [options]

#include <c10/util/Exception.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "args.h"
#include "commands.h"
#include "wuerstchen/error.h"

namespace {

constexpr const char* kUsage =
    "usage: wuerstchen <command> [options]\n"
    "\n"
    "commands:\n"
    "  generate   text to image: stage C (prior), then stages B and A (decoder, VQGAN)\n"
    "  prior      stage C only: save image embeddings as safetensors\n"
    "  decode     stages B and A on saved image embeddings\n"
    "  tokenize   CLIP token ids and attention mask of a text, as JSON\n"
    "  info       configs, parameter counts and dtypes of a model folder\n"
    "  bench      time each stage (text encoding, prior, decoder, VQ decode) as JSON\n"
    "\n"
    "`wuerstchen <command> --help` lists a command's options.\n";

// Keep the error on one line, whatever the exception text holds.
std::string one_line(std::string s) {
    for (char& c : s)
        if (c == '\n' || c == '\r') c = ' ';
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace wuerstchen::cli;
    if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
        std::fputs(kUsage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const std::string command = argv[1];
    try {
        if (command == "generate") return run_generate(argc, argv);
        if (command == "prior") return run_prior(argc, argv);
        if (command == "decode") return run_decode(argc, argv);
        if (command == "tokenize") return run_tokenize(argc, argv);
        if (command == "info") return run_info(argc, argv);
        if (command == "bench") return run_bench(argc, argv);
        std::fprintf(stderr, "wuerstchen: unknown command '%s' (see wuerstchen --help)\n", command.c_str());
        return 2;
    } catch (const UsageError& e) {
        std::fprintf(stderr, "wuerstchen %s: %s\n", command.c_str(), one_line(e.what()).c_str());
        return 2;
    } catch (const wuerstchen::Error& e) {
        std::fprintf(stderr, "wuerstchen %s: %s\n", command.c_str(), one_line(e.what()).c_str());
        return 1;
    } catch (const c10::Error& e) {  // libtorch: its message without the C++ backtrace
        std::fprintf(stderr, "wuerstchen %s: internal error: %s\n", command.c_str(),
                     one_line(e.what_without_backtrace()).c_str());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "wuerstchen %s: internal error: %s\n", command.c_str(),
                     one_line(e.what()).c_str());
        return 1;
    }
}
