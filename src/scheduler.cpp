#include "wuerstchen/scheduler.h"

#include <ATen/ATen.h>

#include <cmath>
#include <functional>
#include <string>
#include <utility>

#include "wuerstchen/error.h"
#include "wuerstchen/pipeline_common.h"

namespace wuerstchen {

namespace {

// numpy.linspace(start, stop, num) in double: i * step + start, the last point exactly stop.
std::vector<double> np_linspace(double start, double stop, int num) {
    std::vector<double> y(static_cast<size_t>(num));
    const double step = (stop - start) / static_cast<double>(num - 1);
    for (int i = 0; i < num; ++i) y[static_cast<size_t>(i)] = static_cast<double>(i) * step + start;
    y.back() = stop;
    return y;
}

std::vector<double> default_stage_c_timesteps() {
    // DEFAULT_STAGE_C_TIMESTEPS = list(np.linspace(1.0, 2 / 3, 20)) + list(np.linspace(2 / 3, 0.0,
    // 11))[1:]
    std::vector<double> ts = np_linspace(1.0, 2.0 / 3.0, 20);
    const std::vector<double> tail = np_linspace(2.0 / 3.0, 0.0, 11);
    ts.insert(ts.end(), tail.begin() + 1, tail.end());
    return ts;
}

// [B] -> [B, 1, ..., 1] with as many trailing ones as `like` has dimensions after the first.
std::vector<int64_t> batch_view(int64_t batch, const torch::Tensor& like) {
    std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
    shape[0] = batch;
    return shape;
}

// The factors of a step from ᾱ(t) and ᾱ(t_prev) (any equal shapes), op for op as upstream
// computes them.
struct StepFactors {
    torch::Tensor inv_sqrt_alpha, one_minus_alpha, sqrt_one_minus_alpha_cumprod, sigma;
};

StepFactors step_factors(const torch::Tensor& alpha_cumprod_t,
                         const torch::Tensor& alpha_cumprod_prev) {
    const auto alpha = alpha_cumprod_t / alpha_cumprod_prev;
    const auto one_minus_alpha = 1 - alpha;
    // Python's `1.0 / alpha` is alpha.reciprocal() * 1.0.
    return {alpha.reciprocal().sqrt(), one_minus_alpha, (1 - alpha_cumprod_t).sqrt(),
            (one_minus_alpha * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod_t)).sqrt()};
}

// Upstream's step from its factors (broadcast over the sample): mu + sigma * noise, the noise
// (made for mu's shape by `draw`, which is called every step) multiplied by 0 when the step ends
// at t = 0; in `dtype`.
torch::Tensor step_from_factors(const StepFactors& f, const torch::Tensor& model_output,
                                const torch::Tensor& sample,
                                const std::function<torch::Tensor(c10::IntArrayRef)>& draw,
                                bool to_zero, torch::ScalarType dtype) {
    auto mu = f.inv_sqrt_alpha *
              (sample - f.one_minus_alpha * model_output / f.sqrt_one_minus_alpha_cumprod);
    auto sigma_noise = f.sigma * draw(mu.sizes());
    // pred = mu + std * (prev_t != 0).float(); prev_t is known on the host: no device sync. The
    // factor 1.0 changes no value, so only 0 is applied.
    auto pred = to_zero ? mu + sigma_noise * 0.0 : mu + sigma_noise;
    return pred.to(dtype);
}

}  // namespace

const std::vector<double> kDefaultStageCTimesteps = default_stage_c_timesteps();

DDPMWuerstchenScheduler::DDPMWuerstchenScheduler(const SchedulerConfig& config) : config_(config) {
    config_.validate("DDPMWuerstchenScheduler");
}

void DDPMWuerstchenScheduler::set_timesteps(int num_inference_steps) {
    check_positive("DDPMWuerstchenScheduler::set_timesteps", "num_inference_steps",
                   num_inference_steps);
    if (num_inference_steps > kMaxSteps)
        throw InvalidArgument("DDPMWuerstchenScheduler::set_timesteps: `num_inference_steps` is " +
                              std::to_string(num_inference_steps) + "; at most " +
                              std::to_string(kMaxSteps) +
                              " steps keep the float32 points distinct");
    // torch.linspace(1.0, 0.0, n + 1): use torch's own float32 algorithm for identical points.
    auto ts = at::linspace(1.0, 0.0, int64_t{num_inference_steps} + 1,
                           torch::TensorOptions().dtype(torch::kFloat32))
                  .contiguous();
    const float* p = ts.data_ptr<float>();
    timesteps_.assign(p, p + ts.numel());
}

void DDPMWuerstchenScheduler::set_timesteps(const std::vector<double>& timesteps) {
    check_timesteps("DDPMWuerstchenScheduler::set_timesteps", "timesteps", timesteps);
    timesteps_.clear();
    for (double t : timesteps) timesteps_.push_back(static_cast<float>(t));
    // Rounding to float32 may merge points that differ by less than an ulp.
    for (size_t i = 1; i < timesteps_.size(); ++i)
        if (!(timesteps_[i] < timesteps_[i - 1]))
            throw InvalidArgument(
                "DDPMWuerstchenScheduler::set_timesteps: `timesteps` must be strictly descending "
                "in float32, got two equal points at index " +
                std::to_string(i));
}

torch::Tensor DDPMWuerstchenScheduler::timesteps() const {
    return torch::tensor(timesteps_, torch::TensorOptions().dtype(torch::kFloat32));
}

torch::Tensor DDPMWuerstchenScheduler::alpha_cumprod(const torch::Tensor& t_in) const {
    auto t = t_in;
    if (config_.scaler > 1)
        t = 1 - (1 - t).pow(config_.scaler);
    else if (config_.scaler < 1)
        t = t.pow(config_.scaler);
    // Upstream keeps s as a float32 tensor of shape [1] (so a float16 t promotes to float32).
    auto s = torch::full({1}, static_cast<float>(config_.s),
                         torch::TensorOptions().dtype(torch::kFloat32).device(t.device()));
    auto init = (s / (1 + s) * M_PI * 0.5).cos().pow(2);
    auto a = ((t + s) / (1 + s) * M_PI * 0.5).cos().pow(2) / init;
    return a.clamp(0.0001, 0.9999);
}

size_t DDPMWuerstchenScheduler::nearest_index(double t) const {
    if (timesteps_.empty())
        throw InvalidArgument("DDPMWuerstchenScheduler: call set_timesteps before stepping");
    // (self.timesteps - timestep[0]).abs().argmin() in float32; the first minimum wins.
    if (!std::isfinite(t))
        throw InvalidArgument("DDPMWuerstchenScheduler: the timestep must be finite, got " +
                              std::to_string(t));
    const float tf = static_cast<float>(t);
    size_t best = 0;
    float best_d = std::fabs(timesteps_[0] - tf);
    for (size_t i = 1; i < timesteps_.size(); ++i) {
        const float d = std::fabs(timesteps_[i] - tf);
        if (d < best_d) {
            best_d = d;
            best = i;
        }
    }
    if (best + 1 >= timesteps_.size())
        throw InvalidArgument("DDPMWuerstchenScheduler: timestep " + std::to_string(t) +
                              " is the last point of the schedule; there is no step after it");
    return best;
}

float DDPMWuerstchenScheduler::previous_timestep(double t) const {
    return timesteps_[nearest_index(t) + 1];
}

torch::Tensor DDPMWuerstchenScheduler::previous_timestep(const torch::Tensor& t) const {
    if (!t.defined() || t.dim() != 1 || t.size(0) < 1)
        throw InvalidArgument(
            "DDPMWuerstchenScheduler::previous_timestep: `timestep` must have shape [B], got " +
            (t.defined() ? c10::str(t.sizes()) : std::string("undefined")));
    const float prev = previous_timestep(t[0].item<double>());
    return torch::full({t.size(0)}, prev,
                       torch::TensorOptions().dtype(torch::kFloat32).device(t.device()));
}

torch::Tensor DDPMWuerstchenScheduler::step(const torch::Tensor& model_output,
                                            const torch::Tensor& t, const torch::Tensor& sample,
                                            at::Generator& generator) const {
    check_output(model_output, sample);
    if (!t.defined() || t.dim() != 1 || t.size(0) != sample.size(0))
        throw InvalidArgument("DDPMWuerstchenScheduler::step: `timestep` must have shape [" +
                              std::to_string(sample.size(0)) + "]");
    const float prev = previous_timestep(t[0].item<double>());
    return step_impl(model_output, t, prev, sample, &generator, {});
}

namespace {

// As the pipelines build it: the float32 point expanded to the batch, in the model's dtype.
torch::Tensor batch_timestep(double t, const torch::Tensor& model_output,
                             const torch::Tensor& sample) {
    return torch::full({sample.size(0)}, static_cast<float>(t),
                       torch::TensorOptions().dtype(torch::kFloat32).device(model_output.device()))
        .to(model_output.scalar_type());
}

}  // namespace

torch::Tensor DDPMWuerstchenScheduler::step(const torch::Tensor& model_output, double t,
                                            const torch::Tensor& sample,
                                            at::Generator& generator) const {
    check_output(model_output, sample);
    const float prev = previous_timestep(t);
    return step_impl(model_output, batch_timestep(t, model_output, sample), prev, sample,
                     &generator, {});
}

torch::Tensor DDPMWuerstchenScheduler::step(const torch::Tensor& model_output, double t,
                                            const torch::Tensor& sample,
                                            const torch::Tensor& noise) const {
    check_noise(model_output, sample, noise);
    const float prev = previous_timestep(t);
    return step_impl(model_output, batch_timestep(t, model_output, sample), prev, sample, nullptr,
                     noise);
}

void DDPMWuerstchenScheduler::check_output(const torch::Tensor& model_output,
                                           const torch::Tensor& sample) {
    if (!sample.defined() || sample.dim() < 1)
        throw InvalidArgument("DDPMWuerstchenScheduler::step: `sample` must be a tensor [B, ...]");
    if (!model_output.defined() || model_output.sizes() != sample.sizes())
        throw InvalidArgument(
            "DDPMWuerstchenScheduler::step: `model_output` must have the "
            "sample's shape " +
            c10::str(sample.sizes()) + ", got " +
            (model_output.defined() ? c10::str(model_output.sizes()) : std::string("undefined")));
}

void DDPMWuerstchenScheduler::check_noise(const torch::Tensor& model_output,
                                          const torch::Tensor& sample, const torch::Tensor& noise) {
    check_output(model_output, sample);
    if (!noise.defined() || noise.sizes() != sample.sizes())
        throw InvalidArgument("DDPMWuerstchenScheduler::step: `noise` must have the sample's "
                              "shape " + c10::str(sample.sizes()) + ", got " +
                              (noise.defined() ? c10::str(noise.sizes()) : std::string("none")));
    // A draw in another dtype is not the model dtype's draw (torch's CPU sampler differs per
    // dtype): no silent cast.
    if (noise.scalar_type() != model_output.scalar_type())
        throw InvalidArgument(
            "DDPMWuerstchenScheduler::step: `noise` must be drawn in the model "
            "output's dtype " +
            std::string(c10::toString(model_output.scalar_type())) + ", got " +
            c10::toString(noise.scalar_type()));
}

torch::Tensor DDPMWuerstchenScheduler::step_impl(const torch::Tensor& model_output,
                                                 const torch::Tensor& t, float prev_t,
                                                 const torch::Tensor& sample,
                                                 at::Generator* generator,
                                                 const torch::Tensor& noise) const {
    const auto dtype = model_output.scalar_type();
    const auto device = model_output.device();
    const int64_t batch = t.size(0);
    const auto view = batch_view(batch, sample);

    auto alpha_cumprod_t = alpha_cumprod(t.to(device)).view(view);
    auto prev =
        torch::full({batch}, prev_t, torch::TensorOptions().dtype(torch::kFloat32).device(device));
    auto alpha_cumprod_prev = alpha_cumprod(prev).view(view);
    // Drawn every step, also when it is multiplied by 0, so the generator advances as upstream's
    // does.
    const auto draw = [&](c10::IntArrayRef sizes) {
        return noise.defined() ? noise.to(device, dtype)
                               : randn_like_diffusers(sizes, *generator, dtype, device);
    };
    return step_from_factors(step_factors(alpha_cumprod_t, alpha_cumprod_prev), model_output,
                             sample, draw, prev_t == 0.0f, dtype);
}

torch::Tensor SchedulerStepPlan::timestep(int i, int64_t batch) const {
    return timesteps.narrow(0, i, 1).expand({batch});
}

SchedulerStepPlan DDPMWuerstchenScheduler::plan_steps(torch::ScalarType dtype,
                                                      torch::Device device) const {
    if (timesteps_.size() < 2)
        throw InvalidArgument("DDPMWuerstchenScheduler::plan_steps: call set_timesteps first");
    SchedulerStepPlan plan;
    plan.points = timesteps_;
    plan.dtype = dtype;
    const auto n = static_cast<int64_t>(timesteps_.size()) - 1;
    // The points on the device in one copy; t as step_impl gets it (float32, then the model's
    // dtype), the step targets as it makes them (float32).
    // (From page-locked memory to CUDA, queued behind the device's work rather than waiting
    // for it as a copy from pageable memory does.)
    auto host = torch::tensor(timesteps_, torch::TensorOptions().dtype(torch::kFloat32));
    if (device.is_cuda()) host = host.pin_memory();
    const auto points = host.to(device, /*non_blocking=*/device.is_cuda());
    plan.device = points.device();  // with its index ("cuda" -> "cuda:0"), as tensors report it
    plan.timesteps = points.narrow(0, 0, n).to(dtype);
    // As step_impl, op for op, on all steps at once.
    StepFactors f =
        step_factors(alpha_cumprod(plan.timesteps), alpha_cumprod(points.narrow(0, 1, n)));
    plan.inv_sqrt_alpha = std::move(f.inv_sqrt_alpha);
    plan.one_minus_alpha = std::move(f.one_minus_alpha);
    plan.sqrt_one_minus_alpha_cumprod = std::move(f.sqrt_one_minus_alpha_cumprod);
    plan.sigma = std::move(f.sigma);
    return plan;
}

torch::Tensor DDPMWuerstchenScheduler::step(const torch::Tensor& model_output,
                                            const SchedulerStepPlan& plan, int i,
                                            const torch::Tensor& sample,
                                            const torch::Tensor& noise) const {
    if (plan.points != timesteps_)
        throw InvalidArgument(
            "DDPMWuerstchenScheduler::step: the plan was made for another schedule");
    if (i < 0 || i >= plan.steps())
        throw InvalidArgument("DDPMWuerstchenScheduler::step: step " + std::to_string(i) +
                              " is outside the plan's " + std::to_string(plan.steps()) + " steps");
    if (model_output.scalar_type() != plan.dtype || model_output.device() != plan.device)
        throw InvalidArgument("DDPMWuerstchenScheduler::step: `model_output` must be " +
                              std::string(c10::toString(plan.dtype)) + " on " + plan.device.str() +
                              " as the plan, got " + c10::toString(model_output.scalar_type()) +
                              " on " + model_output.device().str());
    check_noise(model_output, sample, noise);
    // Step i's factors as [1, ..., 1] views, broadcast over the batch (step_impl: [B, 1, ...]).
    const auto view = batch_view(1, sample);
    const auto at_step = [&](const torch::Tensor& factor) {
        return factor.narrow(0, i, 1).view(view);
    };
    const StepFactors f{at_step(plan.inv_sqrt_alpha), at_step(plan.one_minus_alpha),
                        at_step(plan.sqrt_one_minus_alpha_cumprod), at_step(plan.sigma)};
    const auto given = [&](c10::IntArrayRef) { return noise.to(plan.device, plan.dtype); };
    return step_from_factors(f, model_output, sample, given,
                             plan.points[static_cast<size_t>(i) + 1] == 0.0f, plan.dtype);
}

torch::Tensor DDPMWuerstchenScheduler::add_noise(const torch::Tensor& original_samples,
                                                 const torch::Tensor& noise,
                                                 const torch::Tensor& t) const {
    if (!original_samples.defined() || original_samples.dim() < 1)
        throw InvalidArgument(
            "DDPMWuerstchenScheduler::add_noise: `original_samples` must be a tensor [B, ...]");
    const int64_t batch = original_samples.size(0);
    // As upstream, noise may broadcast to the samples' shape (not beyond it).
    bool fits = false;
    if (noise.defined()) {
        try {
            fits = at::infer_size(noise.sizes(), original_samples.sizes()) ==
                   original_samples.sizes().vec();
        } catch (const c10::Error&) {  // not broadcastable
        }
    }
    if (!fits)
        throw InvalidArgument(
            "DDPMWuerstchenScheduler::add_noise: `noise` must have (or broadcast to) the "
            "samples' shape " +
            c10::str(original_samples.sizes()) + ", got " +
            (noise.defined() ? c10::str(noise.sizes()) : std::string("undefined")));
    if (!t.defined() || t.dim() != 1 || (t.size(0) != batch && t.size(0) != 1))
        throw InvalidArgument("DDPMWuerstchenScheduler::add_noise: `timesteps` must be a tensor [" +
                              std::to_string(batch) + "] or [1], got " +
                              (t.defined() ? c10::str(t.sizes()) : std::string("undefined")));
    const auto view = batch_view(t.size(0), original_samples);
    auto a = alpha_cumprod(t.to(original_samples.device())).view(view);
    auto noisy = a.sqrt() * original_samples + (1 - a).sqrt() * noise;
    return noisy.to(original_samples.scalar_type());
}

}  // namespace wuerstchen
