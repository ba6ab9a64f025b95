#pragma once

// diffusers DDPMWuerstchenScheduler: continuous timesteps t in [0, 1] (1 = pure noise), the
// cosine schedule alpha_cumprod(t) = cos²((t + s) / (1 + s) · π/2) / cos²(s / (1 + s) · π/2)
// clamped to [1e-4, 0.9999], and an ancestral DDPM step whose noise comes from a CPU generator.
// Used by both stages (C and B). All schedule math is float32, as upstream.

#include <ATen/core/Generator.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "wuerstchen/config.h"

namespace wuerstchen {

// What DDPMWuerstchenScheduler::plan_steps makes: for every step of a schedule, the factors that
// step() computes per call from the timestep alone, as float32 tensors [steps] on one device,
// and the model's timestep input. Read-only; made per pipeline call.
struct SchedulerStepPlan {
    std::vector<float> points;                  // the schedule it was made for (timestep_values())
    torch::ScalarType dtype = torch::kFloat32;  // the model's dtype
    torch::Device device = torch::kCPU;         // with its index, as the plan's tensors report it
    torch::Tensor timesteps;       // [steps]: points[i] in the model's dtype (the model's input)
    torch::Tensor inv_sqrt_alpha;  // 1 / alpha, then sqrt; alpha = ᾱ(t) / ᾱ(t_prev)
    torch::Tensor one_minus_alpha;
    torch::Tensor sqrt_one_minus_alpha_cumprod;  // sqrt(1 - ᾱ(t))
    torch::Tensor sigma;  // sqrt((1 - alpha) (1 - ᾱ(t_prev)) / (1 - ᾱ(t)))
    int steps() const { return points.empty() ? 0 : static_cast<int>(points.size()) - 1; }
    // points[i] in the model's dtype expanded to [batch] on the device: the pipelines' `ratio`.
    torch::Tensor timestep(int i, int64_t batch) const;
};

// diffusers' DEFAULT_STAGE_C_TIMESTEPS: linspace(1, 2/3, 20) + linspace(2/3, 0, 11)[1:],
// 30 points (29 steps).
extern const std::vector<double> kDefaultStageCTimesteps;

class DDPMWuerstchenScheduler {
public:
    explicit DDPMWuerstchenScheduler(const SchedulerConfig& config = {});

    const SchedulerConfig& config() const { return config_; }

    // torch.linspace(1, 0, num_inference_steps + 1) in float32. Throws InvalidArgument when
    // num_inference_steps < 1 or > kMaxSteps.
    void set_timesteps(int num_inference_steps);
    // The most steps set_timesteps(n) takes: its points are 1/n apart, and float32's spacing
    // just below 1 is 2^-24, so 2^22 steps keep neighbours at least 4 ulps apart (near 2^24
    // they would round to the same value).
    static constexpr int kMaxSteps = 1 << 22;
    // Custom points, rounded to float32 like torch.Tensor(list). They must be strictly descending
    // within [0, 1], at least two (InvalidArgument otherwise).
    void set_timesteps(const std::vector<double>& timesteps);

    // The current points as a float32 CPU tensor [N + 1] and as host values (float32-rounded).
    torch::Tensor timesteps() const;
    const std::vector<float>& timestep_values() const { return timesteps_; }
    // Number of denoising steps (points - 1).
    int num_steps() const {
        return timesteps_.empty() ? 0 : static_cast<int>(timesteps_.size()) - 1;
    }

    // The clamped cosine schedule at t (any shape, any device); float32 unless t is float64.
    torch::Tensor alpha_cumprod(const torch::Tensor& t) const;

    // The point after the one nearest to t[0], expanded to t's size (as upstream).
    // Throws InvalidArgument when t[0] is nearest to the last point (there is no next one).
    torch::Tensor previous_timestep(const torch::Tensor& t) const;
    // Host-side variant: the point after the one nearest to t.
    float previous_timestep(double t) const;

    // One ancestral step from t to previous_timestep(t). t: [B] (per-sample timesteps; the step
    // target is taken from t[0], which needs a host read). Draws noise of sample's shape from
    // `generator` on the CPU in model_output's dtype every call (also at the last step, where it
    // is multiplied by 0) and returns the new sample in model_output's dtype.
    torch::Tensor step(const torch::Tensor& model_output, const torch::Tensor& t,
                       const torch::Tensor& sample, at::Generator& generator) const;
    // Same with one host-side timestep for the whole batch: no device sync.
    torch::Tensor step(const torch::Tensor& model_output, double t, const torch::Tensor& sample,
                       at::Generator& generator) const;
    // Same with the step's standard-normal noise given instead of drawn (sample's shape and
    // model_output's dtype; moved to its device), e.g. drawn ahead of time in the generator's
    // order. Throws InvalidArgument for another shape or dtype.
    torch::Tensor step(const torch::Tensor& model_output, double t, const torch::Tensor& sample,
                       const torch::Tensor& noise) const;

    // Every step's timestep factors at once (a few ops over all steps instead of about forty
    // tiny ones per step: on a GPU each is a kernel launch). step(model_output, plan, i, ...) is
    // then step i of the current schedule, from point i to point i + 1, with the same values as
    // step(model_output, points[i], ...): on CUDA bit for bit (each element runs the same
    // float32 ops), on the CPU up to a last-bit difference between libtorch's vectorised and
    // scalar cosine (and power, for a scaler other than 1). `dtype` is the model's (the timestep
    // is rounded to it first, as the pipelines pass it). Throws InvalidArgument before
    // set_timesteps.
    SchedulerStepPlan plan_steps(torch::ScalarType dtype, torch::Device device) const;
    // Step i (0 <= i < plan.steps()) of `plan`, which must be this schedule's, with the given
    // noise as the noise overload above; model_output in the plan's dtype, on its device.
    // Throws InvalidArgument otherwise.
    torch::Tensor step(const torch::Tensor& model_output, const SchedulerStepPlan& plan, int i,
                       const torch::Tensor& sample, const torch::Tensor& noise) const;

    // sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise, t: [B] or [1] (for the whole batch); noise of (or
    // broadcasting to) original_samples' shape. Throws InvalidArgument otherwise.
    torch::Tensor add_noise(const torch::Tensor& original_samples, const torch::Tensor& noise,
                            const torch::Tensor& t) const;

    // diffusers' init_noise_sigma.
    static constexpr double kInitNoiseSigma = 1.0;

private:
    size_t nearest_index(double t) const;
    // step()'s checks of `noise` against sample and model_output.
    static void check_noise(const torch::Tensor& model_output, const torch::Tensor& sample,
                            const torch::Tensor& noise);
    // step()'s checks of model_output against sample: both defined, the same shape.
    static void check_output(const torch::Tensor& model_output, const torch::Tensor& sample);
    // Draws the noise from `generator` unless `noise` is defined.
    torch::Tensor step_impl(const torch::Tensor& model_output, const torch::Tensor& t, float prev_t,
                            const torch::Tensor& sample, at::Generator* generator,
                            const torch::Tensor& noise) const;

    SchedulerConfig config_;
    std::vector<float> timesteps_;
};

}  // namespace wuerstchen
