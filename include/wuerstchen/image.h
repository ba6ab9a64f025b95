#pragma once

// Turning the decoder's float images into 8-bit pixels and PNG files.

#include <torch/types.h>

#include <string>
#include <vector>

namespace wuerstchen {

// images: [B, 3, H, W] (or [3, H, W]) floats in [0, 1] on any device -> [B, H, W, 3] uint8 on
// the CPU, rounded as diffusers' numpy_to_pil does: round(x * 255) after clamping.
torch::Tensor to_uint8_hwc(const torch::Tensor& images);

// Writes one image ([3, H, W] float in [0, 1], or [H, W, 3] uint8) as a PNG.
// Throws InvalidArgument for a wrong shape, IoError when the file cannot be written.
void save_png(const std::string& path, const torch::Tensor& image);

// Writes every image of a batch: `path` itself for one image, else path with "-<i>" inserted
// before the extension ("out.png" -> "out-0.png", "out-1.png"). Returns the paths written.
std::vector<std::string> save_pngs(const std::string& path, const torch::Tensor& images);

}  // namespace wuerstchen
