// Text to image with both stages, printing progress from the step callbacks.
//   text_to_image PRIOR_DIR DECODER_DIR "a prompt" out.png
#include <wuerstchen/wuerstchen.h>

#include <iostream>

int main(int argc, char** argv) {
    if (argc != 5) {
        std::cerr << "usage: text_to_image PRIOR_DIR DECODER_DIR PROMPT OUT.png\n";
        return 2;
    }
    try {
        auto pipe = wuerstchen::CombinedPipeline::from_pretrained(argv[1], argv[2]);
        wuerstchen::CombinedOptions options;
        options.prompts = {argv[3]};
        options.height = options.width = 256;
        options.prior_timesteps = wuerstchen::kDefaultStageCTimesteps;
        options.seed = 42;
        options.prior_callback = [](int step, double t, torch::Tensor&) {
            std::cout << "prior step " << step << " t=" << t << "\n";
            return true;
        };
        options.callback = [](int step, double t, torch::Tensor&) {
            std::cout << "decoder step " << step << " t=" << t << "\n";
            return true;
        };
        const auto out = pipe(options);
        for (const auto& path : wuerstchen::save_pngs(argv[4], out.images)) std::cout << path << "\n";
    } catch (const wuerstchen::Error& e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
    return 0;
}
