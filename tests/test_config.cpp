// Config structs: upstream files parse with the right values, absent keys take diffusers'
// defaults, wrong types and impossible values raise ConfigError naming file and key.

#include <gtest/gtest.h>

#include "test_util.h"
#include "wuerstchen/config.h"
#include "wuerstchen/error.h"

namespace wuerstchen {
namespace {

TEST(Config, ParsesFixtureFiles) {
    const auto te = CLIPTextConfig::from_file(test::data_path("tiny-wuerstchen-prior/text_encoder/config.json"));
    EXPECT_EQ(te.hidden_size, 32);
    EXPECT_EQ(te.num_attention_heads, 4);
    EXPECT_EQ(te.hidden_act, "gelu");
    EXPECT_EQ(te.eos_token_id, 624);

    const auto prior = PriorConfig::from_file(test::data_path("tiny-wuerstchen-prior/prior/config.json"));
    EXPECT_EQ(prior.c, 32);
    EXPECT_EQ(prior.depth, 2);

    const auto dec = DiffNeXtConfig::from_file(test::data_path("tiny-wuerstchen/decoder/config.json"));
    EXPECT_EQ(dec.c_hidden, (std::vector<int>{16, 32}));
    EXPECT_EQ(dec.level_config, (std::vector<std::string>{"CT", "CTA"}));
    EXPECT_EQ(dec.inject_effnet, (std::vector<bool>{false, true}));
    EXPECT_EQ(dec.dropout.size(), 2u);

    const auto vq = PaellaVQConfig::from_file(test::data_path("tiny-wuerstchen/vqgan/config.json"));
    EXPECT_EQ(vq.num_vq_embeddings, 64);
    EXPECT_DOUBLE_EQ(vq.scale_factor, 0.3764);

    const auto sched = SchedulerConfig::from_file(test::data_path("tiny-wuerstchen/scheduler/scheduler_config.json"));
    EXPECT_DOUBLE_EQ(sched.s, 0.008);

    const auto prior_index = ModelIndex::from_file(test::data_path("tiny-wuerstchen-prior/model_index.json"));
    EXPECT_EQ(prior_index.class_name, "WuerstchenPriorPipeline");
    EXPECT_DOUBLE_EQ(prior_index.latent_mean, 42.0);
    EXPECT_DOUBLE_EQ(prior_index.resolution_multiple, 42.67);
    EXPECT_TRUE(prior_index.has_component("prior"));

    const auto dec_index = ModelIndex::from_file(test::data_path("tiny-wuerstchen/model_index.json"));
    EXPECT_DOUBLE_EQ(dec_index.latent_dim_scale, 10.67);
    EXPECT_TRUE(dec_index.has_component("vqgan"));
}

TEST(Config, DefaultsForAbsentKeys) {
    const auto prior = PriorConfig::from_json_text("{}", "prior.json");
    EXPECT_EQ(prior.c, 1280);
    EXPECT_EQ(prior.c_cond, 1024);
    EXPECT_EQ(prior.depth, 16);
    const auto dec = DiffNeXtConfig::from_json_text("{}", "dec.json");
    EXPECT_EQ(dec.blocks, (std::vector<int>{4, 4, 14, 4}));
    const auto vq = PaellaVQConfig::from_json_text("{}", "vq.json");
    EXPECT_EQ(vq.bottleneck_blocks, 12);
    EXPECT_EQ(vq.num_vq_embeddings, 8192);
    const auto te = CLIPTextConfig::from_json_text("{}", "te.json");
    EXPECT_EQ(te.hidden_act, "quick_gelu");
    const auto index = ModelIndex::from_json_text("{\"_class_name\": \"X\"}", "mi.json");
    EXPECT_DOUBLE_EQ(index.latent_std, 1.0);
    EXPECT_DOUBLE_EQ(index.latent_dim_scale, 10.67);
    const auto dropout = DiffNeXtConfig::from_json_text(R"({"c_hidden":[8,16],"nhead":[-1,2],"blocks":[1,1],
        "level_config":["CT","CTA"],"inject_effnet":[false,true],"dropout":0.0})", "d.json");
    EXPECT_EQ(dropout.dropout, (std::vector<double>{0.0, 0.0}));
}

TEST(Config, NestedClipTextConfig) {
    const auto te = CLIPTextConfig::from_json_text(R"({"text_config": {"hidden_size": 64, "num_attention_heads": 4}})", "clip.json");
    EXPECT_EQ(te.hidden_size, 64);
}

TEST(Config, WrongTypeNamesFileAndKey) {
    WUERSTCHEN_EXPECT_THROW_MSG(PriorConfig::from_json_text(R"({"c": "big"})", "prior/config.json"),
                                ConfigError, "prior/config.json", "'c'", "integer");
    WUERSTCHEN_EXPECT_THROW_MSG(PriorConfig::from_json_text(R"({"c": 12.5})", "p.json"), ConfigError,
                                "p.json", "'c'");
    WUERSTCHEN_EXPECT_THROW_MSG(DiffNeXtConfig::from_json_text(R"({"inject_effnet": [1, 0, 1, 1]})", "d.json"),
                                ConfigError, "d.json", "'inject_effnet'");
    WUERSTCHEN_EXPECT_THROW_MSG(DiffNeXtConfig::from_json_text(R"({"c_hidden": 320})", "d.json"), ConfigError,
                                "d.json", "'c_hidden'", "list");
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTextConfig::from_json_text(R"({"hidden_act": 3})", "t.json"), ConfigError,
                                "t.json", "'hidden_act'");
    WUERSTCHEN_EXPECT_THROW_MSG(ModelIndex::from_json_text(R"({"latent_mean": "42"})", "model_index.json"),
                                ConfigError, "model_index.json", "'latent_mean'");
    WUERSTCHEN_EXPECT_THROW_MSG(SchedulerConfig::from_json_text(R"({"s": [0.008]})", "s.json"), ConfigError,
                                "s.json", "'s'");
}

TEST(Config, ImpossibleValues) {
    WUERSTCHEN_EXPECT_THROW_MSG(PriorConfig::from_json_text(R"({"c": 30, "nhead": 4})", "p.json"),
                                ConfigError, "p.json", "'nhead'");
    WUERSTCHEN_EXPECT_THROW_MSG(PriorConfig::from_json_text(R"({"depth": 0})", "p.json"), ConfigError,
                                "p.json", "'depth'");
    WUERSTCHEN_EXPECT_THROW_MSG(PriorConfig::from_json_text(R"({"c_r": 2})", "p.json"), ConfigError,
                                "p.json", "'c_r'");
    WUERSTCHEN_EXPECT_THROW_MSG(DiffNeXtConfig::from_json_text(R"({"blocks": [1, 2]})", "d.json"),
                                ConfigError, "d.json", "'blocks'", "one entry per level");
    WUERSTCHEN_EXPECT_THROW_MSG(
        DiffNeXtConfig::from_json_text(R"({"level_config": ["CT", "CTX", "CTA", "CTA"]})", "d.json"),
        ConfigError, "d.json", "'level_config'", "'X'");
    WUERSTCHEN_EXPECT_THROW_MSG(DiffNeXtConfig::from_json_text(R"({"kernel_size": 4})", "d.json"),
                                ConfigError, "d.json", "'kernel_size'");
    WUERSTCHEN_EXPECT_THROW_MSG(PaellaVQConfig::from_json_text(R"({"embed_dim": 30, "levels": 3})", "v.json"),
                                ConfigError, "v.json", "'embed_dim'");
    WUERSTCHEN_EXPECT_THROW_MSG(CLIPTextConfig::from_json_text(R"({"hidden_size": 30, "num_attention_heads": 4})",
                                                               "t.json"),
                                ConfigError, "t.json", "'num_attention_heads'");
    WUERSTCHEN_EXPECT_THROW_MSG(ModelIndex::from_json_text(R"({"resolution_multiple": 0})", "mi.json"),
                                ConfigError, "mi.json", "'resolution_multiple'");
    WUERSTCHEN_EXPECT_THROW_MSG(SchedulerConfig::from_json_text(R"({"scaler": -1})", "s.json"),
                                ConfigError, "s.json", "'scaler'");
}

TEST(Config, InvalidJsonAndMissingFile) {
    WUERSTCHEN_EXPECT_THROW_MSG(PriorConfig::from_json_text("{\"c\": ", "prior/config.json"), ConfigError,
                                "prior/config.json", "invalid JSON");
    WUERSTCHEN_EXPECT_THROW_MSG(PriorConfig::from_json_text("[]", "p.json"), ConfigError, "p.json");
    WUERSTCHEN_EXPECT_THROW_MSG(PriorConfig::from_file("/nonexistent/config.json"), IoError,
                                "/nonexistent/config.json");
}

}  // namespace
}  // namespace wuerstchen
