#pragma once

// A one-line progress bar on stderr per denoising stage: step i/n, it/s and ETA.

#include <chrono>
#include <cstdio>
#include <string>

namespace wuerstchen::cli {

class Progress {
public:
    Progress(std::string label, int total, bool enabled)
        : label_(std::move(label)), total_(total), enabled_(enabled),
          start_(std::chrono::steady_clock::now()) {
        if (enabled_) draw(0);
    }

    void step(int done) {
        if (enabled_) draw(done);
    }

    void finish() {
        if (enabled_ && !finished_) std::fputc('\n', stderr);
        finished_ = true;
    }

    ~Progress() { finish(); }

private:
    void draw(int done) {
        const double secs =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
        const double rate = done > 0 && secs > 0 ? done / secs : 0.0;
        const double eta = rate > 0 ? (total_ - done) / rate : 0.0;
        constexpr int kWidth = 24;
        const int filled = total_ > 0 ? kWidth * done / total_ : kWidth;
        std::string bar(filled, '#');
        bar.resize(kWidth, '.');
        std::fprintf(stderr, "\r%-8s [%s] %d/%d  %.2f it/s  ETA %.1fs ", label_.c_str(), bar.c_str(),
                     done, total_, rate, eta);
        std::fflush(stderr);
    }

    std::string label_;
    int total_;
    bool enabled_;
    bool finished_ = false;
    std::chrono::steady_clock::time_point start_;
};

}  // namespace wuerstchen::cli
