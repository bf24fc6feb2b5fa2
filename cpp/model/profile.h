// Optional per-op timing of forwards (MEDUSA_RT_PROFILE=1): where a step's time goes, by op kind
// and by the number of rows per forward. Off by default; when off an op costs one branch.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>

namespace medusa_rt {

struct ForwardProfile {
  static constexpr int kKinds = 8;
  struct Bucket {
    double seconds[kKinds] = {};
    long forwards = 0;
  };
  std::map<int, Bucket> by_rows;  // rows per forward -> time per op kind

  static std::unique_ptr<ForwardProfile> from_env() {
    const char* v = std::getenv("MEDUSA_RT_PROFILE");
    if (!v || !*v || *v == '0') return nullptr;
    return std::make_unique<ForwardProfile>();
  }

  ~ForwardProfile() {
    static const char* names[kKinds] = {"embed", "rmsnorm", "gemm", "rope+kv", "attention", "elementwise", "lm_head", "total"};
    std::fprintf(stderr, "[medusa_rt] forward profile (ms per forward):\n%6s %8s", "rows", "count");
    for (const char* n : names) std::fprintf(stderr, " %11s", n);
    std::fprintf(stderr, "\n");
    for (const auto& [rows, b] : by_rows) {
      std::fprintf(stderr, "%6d %8ld", rows, b.forwards);
      for (double s : b.seconds) std::fprintf(stderr, " %11.3f", 1e3 * s / double(b.forwards));
      std::fprintf(stderr, "\n");
    }
  }
};

// Times the ops of one forward into a profile (if any).
class OpTimer {
 public:
  enum Kind { kEmbed, kNorm, kGemm, kRope, kAttention, kElementwise, kLmHead, kTotal };
  explicit OpTimer(ForwardProfile* p) : p_(p) {
    if (p_) t0_ = Clock::now();
  }
  template <class F>
  void run(Kind k, F&& f) {
    if (!p_) {
      f();
      return;
    }
    const auto t = Clock::now();
    f();
    acc_[k] += std::chrono::duration<double>(Clock::now() - t).count();
  }
  void finish(int rows) {
    if (!p_) return;
    acc_[kTotal] = std::chrono::duration<double>(Clock::now() - t0_).count();
    auto& b = p_->by_rows[rows];
    for (int i = 0; i < ForwardProfile::kKinds; ++i) b.seconds[i] += acc_[i];
    ++b.forwards;
  }

 private:
  using Clock = std::chrono::steady_clock;
  ForwardProfile* p_;
  Clock::time_point t0_;
  double acc_[ForwardProfile::kKinds] = {};
};

}  // namespace medusa_rt
