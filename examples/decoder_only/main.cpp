// Stages B and A only: saved image embeddings -> PNG.
//   decoder_only DECODER_DIR embeddings.safetensors out.png
#include <wuerstchen/wuerstchen.h>

#include <iostream>

int main(int argc, char** argv) {
    if (argc != 4) {
        std::cerr << "usage: decoder_only DECODER_DIR EMBEDDINGS.safetensors OUT.png\n";
        return 2;
    }
    try {
        auto decoder = wuerstchen::DecoderPipeline::from_pretrained(argv[1]);
        const auto file = wuerstchen::SafeTensors::open(argv[2]);
        wuerstchen::DecoderOptions options;
        options.image_embeddings = file.tensor("image_embeddings").to(torch::kFloat32);
        options.seed = 0;
        const torch::Tensor images = decoder(options).images;
        for (const auto& path : wuerstchen::save_pngs(argv[3], images)) std::cout << path << "\n";
    } catch (const wuerstchen::Error& e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
    return 0;
}
