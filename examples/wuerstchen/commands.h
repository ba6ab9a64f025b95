#pragma once

// The subcommands of the `wuerstchen` tool. Each returns the process exit status and throws
// UsageError (status 2) or wuerstchen::Error (status 1) with a one-line message.

#include <string>
#include <vector>

#include "args.h"
#include "wuerstchen/weights.h"

namespace wuerstchen::cli {

int run_generate(int argc, char** argv);
int run_prior(int argc, char** argv);
int run_decode(int argc, char** argv);
int run_tokenize(int argc, char** argv);
int run_info(int argc, char** argv);
int run_bench(int argc, char** argv);

// Shared by the subcommands (commands.cpp).
// The groups' flags one after the other.
std::vector<FlagSpec> concat(std::vector<std::vector<FlagSpec>> groups);
// --decoder-steps, --decoder-guidance.
std::vector<FlagSpec> decoder_flags();
// The flags load_options reads: --device, --dtype, --offload, --sequential-offload,
// --cuda-graphs, --channels-last, --cudnn-benchmark, --threads.
std::vector<FlagSpec> load_flags();
// LoadOptions from load_flags(); UsageError for a bad value or CUDA asked for but absent.
// Also sets libtorch's CPU thread count (--threads) and cuDNN's benchmark mode
// (--cudnn-benchmark), both process-wide.
LoadOptions load_options(const Args& args);
// 'default' (kDefaultStageCTimesteps) or a comma-separated list of numbers.
std::vector<double> parse_timesteps(const std::string& flag, const std::string& text);
// --height / --width: a positive multiple of 128 (default 1024).
int pixel_size(const Args& args, const std::string& flag);

}  // namespace wuerstchen::cli
