#include "wuerstchen/image.h"

#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBIW_WINDOWS_UTF8
#include <stb_image_write.h>

#include <algorithm>
#include <limits>

#include "wuerstchen/error.h"

namespace wuerstchen {

torch::Tensor to_uint8_hwc(const torch::Tensor& images) {
    if (!images.defined() || (images.dim() != 3 && images.dim() != 4))
        throw InvalidArgument("images: expected [B, 3, H, W] or [3, H, W]");
    torch::Tensor x = images.dim() == 3 ? images.unsqueeze(0) : images;
    if (x.size(1) != 3) throw InvalidArgument("images: expected 3 channels, got " + std::to_string(x.size(1)));
    if (x.scalar_type() == torch::kUInt8)  // already pixels: only the layout changes
        return x.detach().to(torch::kCPU).permute({0, 2, 3, 1}).clone(at::MemoryFormat::Contiguous);
    if (!x.is_floating_point())
        throw InvalidArgument(
            std::string("images: expected floats in [0, 1] or uint8 pixels, got ") +
            c10::toString(x.scalar_type()));
    x = x.detach().to(torch::kCPU, torch::kFloat32).clamp(0.0, 1.0);
    return (x * 255.0).round().to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous();
}

void save_png(const std::string& path, const torch::Tensor& image) {
    torch::Tensor hwc;
    if (!image.defined()) throw InvalidArgument("save_png: image is undefined");
    if (image.scalar_type() == torch::kUInt8 && image.dim() == 3 && image.size(2) == 3) {
        hwc = image.to(torch::kCPU).contiguous();
    } else if (image.dim() == 3 && image.size(0) == 3) {
        hwc = to_uint8_hwc(image)[0];
    } else {
        throw InvalidArgument(
            "save_png: image must be [3, H, W] (floats in [0, 1] or uint8) or "
            "[H, W, 3] uint8, got " +
            c10::str(image.sizes()));
    }
    if (hwc.size(0) > std::numeric_limits<int>::max() / 3 ||
        hwc.size(1) > std::numeric_limits<int>::max() / 3 / std::max<int64_t>(hwc.size(0), 1))
        throw InvalidArgument("save_png: image of " + c10::str(image.sizes()) +
                              " is too large for a PNG writer");
    const int h = static_cast<int>(hwc.size(0));
    const int w = static_cast<int>(hwc.size(1));
    if (h <= 0 || w <= 0) throw InvalidArgument("save_png: empty image");
    if (!stbi_write_png(path.c_str(), w, h, 3, hwc.data_ptr<uint8_t>(), w * 3))
        throw IoError(path + ": cannot write PNG");
}

std::vector<std::string> save_pngs(const std::string& path, const torch::Tensor& images) {
    if (!images.defined() || (images.dim() != 3 && images.dim() != 4))
        throw InvalidArgument("save_pngs: images must be [B, 3, H, W] or one image, got " +
                              (images.defined() ? c10::str(images.sizes()) : "undefined"));
    const torch::Tensor batch = images.dim() == 3 ? images.unsqueeze(0) : images;
    if (batch.size(0) < 1) throw InvalidArgument("save_pngs: the batch holds no images");
    std::vector<std::string> written;
    if (batch.size(0) == 1) {
        save_png(path, batch[0]);
        written.push_back(path);
        return written;
    }
    const auto slash = path.find_last_of('/');
    auto dot = path.find_last_of('.');
    if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) dot = path.size();
    for (int64_t i = 0; i < batch.size(0); ++i) {
        const std::string p = path.substr(0, dot) + "-" + std::to_string(i) + path.substr(dot);
        save_png(p, batch[i]);
        written.push_back(p);
    }
    return written;
}

}  // namespace wuerstchen
