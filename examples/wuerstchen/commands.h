#pragma once

// The subcommands of the `wuerstchen` tool. Each returns the process exit status and throws
// UsageError (status 2) or wuerstchen::Error (status 1) with a one-line message.

namespace wuerstchen::cli {

int run_generate(int argc, char** argv);
int run_prior(int argc, char** argv);
int run_decode(int argc, char** argv);
int run_tokenize(int argc, char** argv);
int run_info(int argc, char** argv);

}  // namespace wuerstchen::cli
