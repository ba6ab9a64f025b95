#include "test_util.h"

#include <ATen/record_function.h>
#include <ftw.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

namespace wuerstchen::test {

std::string data_path(const std::string& rel) {
    return std::string(WUERSTCHEN_TEST_DATA) + "/" + rel;
}

std::string shared_path(const std::string& rel) {
#ifdef WUERSTCHEN_SHARED_DIR
    return std::string(WUERSTCHEN_SHARED_DIR) + "/" + rel;
#else
    return "../shared/" + rel;
#endif
}

bool file_exists(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

SafeTensors reference(const std::string& name) {
    return SafeTensors::open(data_path("references/" + name + ".safetensors"));
}

torch::Tensor ref_tensor(const SafeTensors& file, const std::string& key) {
    return file.tensor(key).clone().contiguous();
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
    return (a.to(torch::kCPU, torch::kDouble) - b.to(torch::kCPU, torch::kDouble))
        .abs()
        .max()
        .item<double>();
}

double scaled_tol(const torch::Tensor& expected, double rel) {
    const double m = expected.to(torch::kDouble).abs().max().item<double>();
    return rel * std::max(1.0, m);
}

::testing::AssertionResult all_close(const std::string& what, const torch::Tensor& actual,
                                     const torch::Tensor& expected, double tol) {
    if (actual.sizes() != expected.sizes())
        return ::testing::AssertionFailure()
               << what << ": shape " << actual.sizes() << " != expected " << expected.sizes();
    const double err = max_abs_diff(actual, expected);
    std::cout << "[ parity   ] " << what << ": max abs error " << err << " (tolerance " << tol
              << ")" << std::endl;
    if (!(err <= tol))
        return ::testing::AssertionFailure()
               << what << ": max abs error " << err << " exceeds " << tol;
    return ::testing::AssertionSuccess();
}

std::string make_temp_dir(const std::string& prefix) {
    std::string tmpl = "/tmp/" + prefix + "XXXXXX";
    char* dir = ::mkdtemp(tmpl.data());
    if (!dir) throw std::runtime_error("mkdtemp failed");
    return dir;
}

void remove_tree(const std::string& path) {
    // Depth first, not following links: files and links first, then their folder.
    ::nftw(
        path.c_str(),
        [](const char* name, const struct stat*, int, struct FTW*) { return std::remove(name); },
        16, FTW_DEPTH | FTW_PHYS);
}

void write_file(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error("cannot write " + path);
}

std::vector<torch::Tensor> parameters_named(const torch::nn::Module& module,
                                            const std::string& suffix) {
    std::vector<torch::Tensor> out;
    for (const auto& item : module.named_parameters()) {
        const std::string& name = item.key();
        if (name.size() >= suffix.size() &&
            name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
            out.push_back(item.value());
    }
    return out;
}

namespace {

// Whether the tensors are stored back to back in one buffer, in this order.
bool back_to_back(const std::vector<torch::Tensor>& tensors) {
    for (size_t i = 1; i < tensors.size(); ++i) {
        const auto* end =
            static_cast<const char*>(tensors[i - 1].data_ptr()) + tensors[i - 1].nbytes();
        if (!tensors[i].is_alias_of(tensors[0]) || tensors[i].data_ptr() != end) return false;
    }
    return true;
}

}  // namespace

bool stored_back_to_back(const torch::nn::Module& module, const std::string& suffix) {
    const auto tensors = parameters_named(module, suffix);
    return tensors.size() >= 2 && back_to_back(tensors);
}

int folded_layer_count(const torch::nn::Module& module, int64_t width) {
    int count = 0;
    for (const auto& w : parameters_named(module, "channelwise.0.weight"))
        count += w.dim() == 2 && w.stride(1) == 1 && w.stride(0) == w.size(1) + width;
    return count;
}

ProjectionLayout attention_projection_layout(const torch::nn::Module& module,
                                             const std::array<std::string, 3>& names) {
    const auto params = module.named_parameters();
    const std::string q_weight = names[0] + ".weight";
    ProjectionLayout layout;
    for (const auto& item : params) {
        const std::string& name = item.key();
        if (name.size() < q_weight.size() ||
            name.compare(name.size() - q_weight.size(), q_weight.size(), q_weight) != 0)
            continue;
        const std::string prefix = name.substr(0, name.size() - q_weight.size());
        std::vector<torch::Tensor> weights, biases;
        for (const std::string& proj : names) {
            const auto* w = params.find(prefix + proj + ".weight");
            const auto* b = params.find(prefix + proj + ".bias");
            if (w == nullptr || b == nullptr) break;
            weights.push_back(*w);
            biases.push_back(*b);
        }
        if (weights.size() != 3) continue;  // not an attention module
        ++layout.attention;
        layout.packed += back_to_back(weights) && back_to_back(biases) ? 1 : 0;
    }
    return layout;
}

namespace {

std::string printed(const torch::nn::Module& module) {
    std::ostringstream out;
    out << module;
    return out.str();
}

}  // namespace

void expect_same_structure(const torch::nn::Module& ordinary, const torch::nn::Module& unwritten) {
    EXPECT_EQ(printed(ordinary), printed(unwritten));
    const auto a = ordinary.named_parameters();
    const auto b = unwritten.named_parameters();
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) {
        EXPECT_EQ(a[i].key(), b[i].key());
        EXPECT_EQ(a[i].value().sizes(), b[i].value().sizes()) << a[i].key();
        EXPECT_EQ(a[i].value().scalar_type(), b[i].value().scalar_type()) << a[i].key();
        EXPECT_EQ(a[i].value().defined(), b[i].value().defined()) << a[i].key();
    }
    const auto ab = ordinary.named_buffers();
    const auto bb = unwritten.named_buffers();
    ASSERT_EQ(ab.size(), bb.size());
    for (size_t i = 0; i < ab.size(); ++i) {
        EXPECT_EQ(ab[i].key(), bb[i].key());
        EXPECT_TRUE(torch::equal(ab[i].value(), bb[i].value())) << ab[i].key();
    }
}

void expect_same_values(const torch::nn::Module& a, const torch::nn::Module& b) {
    const auto pa = a.named_parameters();
    const auto pb = b.named_parameters();
    ASSERT_EQ(pa.size(), pb.size());
    for (size_t i = 0; i < pa.size(); ++i)
        EXPECT_TRUE(torch::equal(pa[i].value(), pb[i].value())) << pa[i].key();
    const auto ba = a.named_buffers();
    const auto bb = b.named_buffers();
    ASSERT_EQ(ba.size(), bb.size());
    for (size_t i = 0; i < ba.size(); ++i)
        EXPECT_TRUE(torch::equal(ba[i].value(), bb[i].value())) << ba[i].key();
}

LoadOptions unpacked_load() {
    LoadOptions o;
    o.offload = true;
    return o;
}

namespace {

thread_local std::map<std::string, int>* op_counts = nullptr;

// Counts into `counts` while alive.
class OpCounter {
public:
    explicit OpCounter(std::map<std::string, int>& counts) {
        op_counts = &counts;
        auto on_start = [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
            const auto it = op_counts->find(fn.name());
            if (it != op_counts->end()) ++it->second;
            return nullptr;
        };
        handle_ = at::addThreadLocalCallback(
            at::RecordFunctionCallback(on_start).scopes({at::RecordScope::FUNCTION}));
    }
    ~OpCounter() {
        at::removeCallback(handle_);
        op_counts = nullptr;
    }
    OpCounter(const OpCounter&) = delete;
    OpCounter& operator=(const OpCounter&) = delete;

private:
    at::CallbackHandle handle_;
};

}  // namespace

std::map<std::string, int> count_ops(const std::vector<std::string>& ops,
                                     const std::function<void()>& run) {
    std::map<std::string, int> counts;
    for (const auto& op : ops) counts[op] = 0;
    {
        const OpCounter counting(counts);
        run();
    }
    return counts;
}

}  // namespace wuerstchen::test
