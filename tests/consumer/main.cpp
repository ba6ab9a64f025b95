// Links against the installed library and reads a config through the public API.
#include <wuerstchen/config.h>
#include <wuerstchen/error.h>

#include <iostream>

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    try {
        const auto config = wuerstchen::PriorConfig::from_file(argv[1]);
        std::cout << "prior c=" << config.c << " depth=" << config.depth << std::endl;
        return config.c > 0 ? 0 : 1;
    } catch (const wuerstchen::Error& e) {
        std::cerr << e.what() << std::endl;
        return 1;
    }
}
