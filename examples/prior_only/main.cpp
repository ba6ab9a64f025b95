// Stage C only: text -> image embeddings, saved as safetensors for a later decode.
//   prior_only PRIOR_DIR "a prompt" embeddings.safetensors
#include <wuerstchen/wuerstchen.h>

#include <iostream>

int main(int argc, char** argv) {
    if (argc != 4) {
        std::cerr << "usage: prior_only PRIOR_DIR PROMPT OUT.safetensors\n";
        return 2;
    }
    try {
        auto prior = wuerstchen::PriorPipeline::from_pretrained(argv[1]);
        wuerstchen::PriorOptions options;
        options.prompts = {argv[2]};
        options.height = options.width = 256;
        options.timesteps = wuerstchen::kDefaultStageCTimesteps;
        options.guidance_scale = 4.0;
        options.seed = 0;
        const torch::Tensor embeddings = prior(options).image_embeddings;
        wuerstchen::save_safetensors(argv[3], {{"image_embeddings", embeddings}});
        std::cout << "image_embeddings " << embeddings.sizes() << " -> " << argv[3] << "\n";
    } catch (const wuerstchen::Error& e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
    return 0;
}
