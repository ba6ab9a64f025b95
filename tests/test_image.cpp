// PNG output: pixel rounding as diffusers' numpy_to_pil, file written and decodable, numbering.

#include <gtest/gtest.h>

#define STB_IMAGE_IMPLEMENTATION
#include <stb_image.h>

#include "test_util.h"
#include "wuerstchen/error.h"
#include "wuerstchen/image.h"

namespace wuerstchen {
namespace {

TEST(Image, Uint8RoundingAndLayout) {
    torch::Tensor img = torch::zeros({1, 3, 2, 2});
    img[0][0][0][1] = 0.5f;   // 127.5 rounds to 128 (half to even: 128)
    img[0][1][1][0] = 1.2f;   // clamped
    img[0][2][1][1] = -0.3f;  // clamped
    torch::Tensor u8 = to_uint8_hwc(img);
    EXPECT_EQ(u8.sizes(), torch::IntArrayRef({1, 2, 2, 3}));
    EXPECT_EQ(u8[0][0][1][0].item<uint8_t>(), 128);
    EXPECT_EQ(u8[0][1][0][1].item<uint8_t>(), 255);
    EXPECT_EQ(u8[0][1][1][2].item<uint8_t>(), 0);
}

TEST(Image, SavePngsNumbersAndDecodes) {
    const std::string dir = test::make_temp_dir("png_test_");
    torch::Tensor imgs = torch::rand({2, 3, 8, 12});
    const auto paths = save_pngs(dir + "/out.png", imgs);
    ASSERT_EQ(paths.size(), 2u);
    EXPECT_EQ(paths[1], dir + "/out-1.png");
    int w = 0, h = 0, c = 0;
    unsigned char* data = stbi_load(paths[1].c_str(), &w, &h, &c, 3);
    ASSERT_NE(data, nullptr);
    EXPECT_EQ(w, 12);
    EXPECT_EQ(h, 8);
    torch::Tensor expected = to_uint8_hwc(imgs)[1];
    EXPECT_EQ(std::memcmp(data, expected.data_ptr<uint8_t>(), 8 * 12 * 3), 0);
    stbi_image_free(data);
}

// uint8 images are pixels already, in either layout: written as they are, not scaled by 255.
TEST(Image, Uint8ImagesKeepTheirValues) {
    const auto chw = torch::randint(0, 256, {3, 4, 5}, torch::kUInt8);
    EXPECT_TRUE(torch::equal(to_uint8_hwc(chw)[0], chw.permute({1, 2, 0})));
    // Always a copy, also of a permuted HWC image (whose memory is already in that order).
    const auto hwc = chw.permute({1, 2, 0}).contiguous();
    EXPECT_NE(to_uint8_hwc(hwc.permute({2, 0, 1})).data_ptr(), hwc.data_ptr());
    const std::string dir = test::make_temp_dir("png_u8_");
    for (const auto& image : {chw, chw.permute({1, 2, 0}).contiguous()}) {
        save_png(dir + "/u8.png", image);
        int w = 0, h = 0, c = 0;
        unsigned char* data = stbi_load((dir + "/u8.png").c_str(), &w, &h, &c, 3);
        ASSERT_NE(data, nullptr);
        EXPECT_EQ(
            std::memcmp(data, chw.permute({1, 2, 0}).contiguous().data_ptr<uint8_t>(), 4 * 5 * 3),
            0);
        stbi_image_free(data);
    }
    test::remove_tree(dir);
}

TEST(Image, Errors) {
    WUERSTCHEN_EXPECT_THROW_MSG(save_pngs("x.png", torch::Tensor()), InvalidArgument, "save_pngs",
                                "undefined");
    WUERSTCHEN_EXPECT_THROW_MSG(save_pngs("x.png", torch::zeros({0, 3, 4, 4})), InvalidArgument,
                                "save_pngs", "no images");
    WUERSTCHEN_EXPECT_THROW_MSG(save_pngs("x.png", torch::tensor(1.0)), InvalidArgument,
                                "save_pngs");
    WUERSTCHEN_EXPECT_THROW_MSG(save_png("x.png", torch::Tensor()), InvalidArgument, "undefined");
    WUERSTCHEN_EXPECT_THROW_MSG(to_uint8_hwc(torch::zeros({1, 3, 2, 2}, torch::kInt32)),
                                InvalidArgument, "images", "Int");
    WUERSTCHEN_EXPECT_THROW_MSG(to_uint8_hwc(torch::zeros({1, 4, 2, 2})), InvalidArgument, "images",
                                "3 channels");
    WUERSTCHEN_EXPECT_THROW_MSG(save_png("/nonexistent-dir/x.png", torch::zeros({3, 2, 2})), IoError,
                                "/nonexistent-dir/x.png");
}

}  // namespace
}  // namespace wuerstchen
