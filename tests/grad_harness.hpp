// The backward's test harness, shared by the GPU backward tests (tests/test_cuda_backward.cpp) and the fuzz
// program (tools/fuzz/fuzz_backward.cpp). For one oracle::Case (tests/oracle_case.hpp):
//  * random inputs (q, k, v, dout, optional dlse) exactly representable in the case's 16-bit type;
//  * one forward + backward on any device: host buffers for Device::cpu, device buffers otherwise, every output
//    poisoned with all bits set (NaN in every float type) first, the backward workspace too;
//  * what the run wrote, read back into canonical [B, S, H, D] order, with the structural checks: elements left
//    unwritten (still NaN), elements outside the strided views that changed, and the gradients of keys no query
//    sees (text padding; with the independent oracle's mask, every such key), which must be exactly zero;
//  * the accuracy rule of the spec's "Gradients" section (judge()).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "oracle_case.hpp"
#include "tilewise/tilewise.hpp"

#ifdef TILEWISE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace gradcheck {

using tilewise::Device;
using tilewise::DType;

/// A CUDA runtime call failed. After an asynchronous fault (illegal address) the context is lost and every
/// later call fails too, so callers that loop (the fuzz program) stop at the first one.
class CudaFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

#ifdef TILEWISE_WITH_CUDA
inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw CudaFailure(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
#endif

/// Bytes on the host (for Device::cpu plans) or on the GPU (cuda, cuda_reference), 256-byte aligned either way.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Device device, size_t bytes) : device_(device), bytes_(bytes) {
    if (bytes == 0) return;
    if (device == Device::cpu) {
      ptr_ = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
      if (ptr_ == nullptr) throw std::bad_alloc();
      return;
    }
#ifdef TILEWISE_WITH_CUDA
    cuda_check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
#else
    throw std::logic_error("gradcheck::Buffer: a GPU buffer in a build without CUDA");
#endif
  }
  ~Buffer() { release(); }
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      device_ = o.device_, ptr_ = std::exchange(o.ptr_, nullptr), bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }

  void upload(const void* host, size_t bytes) {
    if (bytes > bytes_) throw std::logic_error("gradcheck::Buffer::upload: too many bytes");
    if (bytes == 0) return;
    if (device_ == Device::cpu) {
      std::memcpy(ptr_, host, bytes);
      return;
    }
#ifdef TILEWISE_WITH_CUDA
    cuda_check(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to the device");
#endif
  }
  template <class T>
  void upload(const std::vector<T>& host) { upload(host.data(), host.size() * sizeof(T)); }

  /// Every byte of the buffer (the caller has synchronised the stream that wrote it).
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> out(bytes_);
    if (bytes_ == 0) return out;
    if (device_ == Device::cpu) {
      std::memcpy(out.data(), ptr_, bytes_);
      return out;
    }
#ifdef TILEWISE_WITH_CUDA
    cuda_check(cudaMemcpy(out.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
#endif
    return out;
  }

  /// The buffer's bytes as `count` values of T.
  template <class T>
  std::vector<T> download_as(size_t count) const {
    const std::vector<uint8_t> raw = download();
    if (count * sizeof(T) > raw.size()) throw std::logic_error("gradcheck::Buffer::download_as: too many values");
    std::vector<T> out(count);
    std::memcpy(out.data(), raw.data(), count * sizeof(T));
    return out;
  }

  /// Sets every byte; on the GPU asynchronously on `stream` (so a CUDA graph can capture it).
  void fill(uint8_t byte, void* stream) {
    if (bytes_ == 0) return;
    if (device_ == Device::cpu) {
      std::memset(ptr_, byte, bytes_);
      return;
    }
#ifdef TILEWISE_WITH_CUDA
    cuda_check(cudaMemsetAsync(ptr_, byte, bytes_, static_cast<cudaStream_t>(stream)), "cudaMemsetAsync");
#else
    (void)stream;
#endif
  }

 private:
  void release() {
    if (ptr_ == nullptr) return;
    if (device_ == Device::cpu) std::free(ptr_);
#ifdef TILEWISE_WITH_CUDA
    else cudaFree(ptr_);
#endif
    ptr_ = nullptr;
  }
  Device device_ = Device::cpu;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

/// `bytes` on `device`, filled from `host` when given.
inline Buffer make_buffer(Device device, size_t bytes, const void* host = nullptr) {
  Buffer b(device, bytes);
  if (host != nullptr) b.upload(host, bytes);
  return b;
}

/// Waits for all work on the device (a no-op for the CPU, whose runs are synchronous).
inline void synchronize(Device device) {
#ifdef TILEWISE_WITH_CUDA
  if (device != Device::cpu) {
    cuda_check(cudaGetLastError(), "a kernel launch");
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (a fault in a kernel of the run)");
  }
#else
  (void)device;
#endif
}

// ---- inputs -----------------------------------------------------------------------------------------------

/// Inputs of one problem, as exact values of the case's 16-bit type (so the 16-bit and the float64 runs read
/// the same numbers). qkv and dout are whole buffers laid out by oracle::make_views (gaps included).
struct Inputs {
  std::vector<double> qkv;        // q at 0, k at views.k_offset, v at views.v_offset
  std::vector<double> dout;       // o's view
  std::vector<float> dlse;        // [B, Hq, S]; empty: run without dlse (zero)
  std::vector<int32_t> text_len;  // [B]; empty: run without text_len (every text position valid)
};

/// Fresh standard-normal data (never zeros) from `seed`, rounded to the case's type.
inline Inputs random_inputs(const oracle::Case& c, bool with_dlse, uint64_t seed) {
  const oracle::Views views = oracle::make_views(c);
  const oracle::Storage storage = oracle::storage_of(c.dtype);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Inputs in;
  in.qkv.resize(views.in_size);
  in.dout.resize(views.out_size);
  for (double& x : in.qkv) x = oracle::round_trip(storage, normal(rng));
  for (double& x : in.dout) x = oracle::round_trip(storage, normal(rng));
  if (with_dlse) {
    in.dlse.resize(c.batch * c.q_heads * c.seq_len());
    for (float& x : in.dlse) x = static_cast<float>(normal(rng));
  }
  in.text_len = c.text_len;
  return in;
}

/// Values as elements of `dtype` (bf16/f16: round to nearest even; exact for Inputs' values).
inline std::vector<uint8_t> encode(const std::vector<double>& values, DType dtype) {
  const oracle::Storage s = oracle::storage_of(dtype);
  std::vector<uint8_t> bytes(values.size() * oracle::storage_size(s));
  for (size_t i = 0; i < values.size(); ++i) oracle::store(s, bytes.data(), static_cast<int64_t>(i), values[i]);
  return bytes;
}

// ---- what a run wrote -------------------------------------------------------------------------------------

enum Tensor { kO, kLse, kDq, kDk, kDv, kNumTensors };
inline constexpr std::array<const char*, kNumTensors> kTensorNames{"o", "lse", "dq", "dk", "dv"};

struct Outputs {
  /// o, dq, dk, dv in canonical [B, S, H, D] order (H = Hq for o and dq, Hkv for dk and dv); lse [B, Hq, S].
  std::array<std::vector<double>, kNumTensors> values;
  std::vector<uint8_t> grad_bytes;  // the dq/dk/dv buffer as written, for bitwise comparisons
  std::array<int64_t, kNumTensors> nonfinite{};  // elements not finite (still NaN from the poison: unwritten)
  int64_t written_outside_views = 0;  // elements of the o and gradient buffers outside their views that changed

  const std::vector<double>& operator[](Tensor t) const { return values[t]; }
};

/// Element offsets of a [B, S, H, D] view, in canonical order.
template <class F>
void for_each_element(const oracle::Case& c, const oracle::Strides3& s, int64_t heads, int64_t offset, F&& f) {
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t i = 0; i < c.seq_len(); ++i)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < c.head_dim; ++d) f(offset + b * s.batch + i * s.seq + h * s.head + d);
}

/// The elements of a strided view, in canonical order, marking them in `addressed`.
inline std::vector<double> gather(const oracle::Case& c, const oracle::Strides3& s, int64_t heads, int64_t offset,
                                  const std::vector<uint8_t>& bytes, DType dtype, std::vector<bool>& addressed) {
  std::vector<double> out;
  out.reserve(c.batch * c.seq_len() * heads * c.head_dim);
  const oracle::Storage storage = oracle::storage_of(dtype);
  for_each_element(c, s, heads, offset, [&](int64_t e) {
    out.push_back(oracle::load(storage, bytes.data(), e));
    addressed[e] = true;
  });
  return out;
}

/// Elements outside the views whose bytes are no longer the poison (all bits set).
inline int64_t changed_outside(const std::vector<uint8_t>& bytes, const std::vector<bool>& addressed, size_t esize) {
  int64_t n = 0;
  for (size_t e = 0; e < addressed.size(); ++e) {
    if (addressed[e]) continue;
    for (size_t i = 0; i < esize; ++i)
      if (bytes[e * esize + i] != 0xFF) {
        ++n;
        break;
      }
  }
  return n;
}

inline tilewise::Problem problem_of(const oracle::Case& c, DType dtype) {
  tilewise::Problem p = oracle::to_problem(c);
  p.dtype = dtype;
  return p;
}

/// Every buffer of one problem on a plan's device: inputs uploaded once, outputs poisoned before each run.
class Workbench {
 public:
  Workbench(const tilewise::Plan& plan, const oracle::Case& c, const Inputs& in)
      : plan_(plan), case_(c), views_(oracle::make_views(c)), dtype_(plan.problem().dtype),
        esize_(tilewise::dtype_size(dtype_)) {
    const Device dev = plan.device();
    const int64_t lse_elems = c.batch * c.q_heads * c.seq_len();
    qkv_ = Buffer(dev, views_.in_size * esize_);
    qkv_.upload(encode(in.qkv, dtype_));
    dout_ = Buffer(dev, views_.out_size * esize_);
    dout_.upload(encode(in.dout, dtype_));
    o_ = Buffer(dev, views_.out_size * esize_);
    lse_ = Buffer(dev, lse_elems * sizeof(float));
    grads_ = Buffer(dev, views_.in_size * esize_);
    if (!in.dlse.empty()) {
      dlse_ = Buffer(dev, in.dlse.size() * sizeof(float));
      dlse_.upload(in.dlse);
    }
    if (!in.text_len.empty()) {
      text_len_ = Buffer(dev, in.text_len.size() * sizeof(int32_t));
      text_len_.upload(in.text_len);
    }
    workspace_ = Buffer(dev, plan.backward_workspace_bytes());
  }

  const tilewise::Plan& plan() const { return plan_; }
  void* workspace() const { return workspace_.data(); }
  size_t grad_buffer_bytes() const { return grads_.bytes(); }

  tilewise::Tensors tensors() {
    return {at(qkv_, 0), at(qkv_, views_.k_offset), at(qkv_, views_.v_offset), o_.data(),
            static_cast<float*>(lse_.data()), static_cast<const int32_t*>(text_len_.data())};
  }
  tilewise::GradTensors grad_tensors() {
    tilewise::GradTensors g;
    g.q = at(qkv_, 0), g.k = at(qkv_, views_.k_offset), g.v = at(qkv_, views_.v_offset);
    g.o = o_.data();
    g.lse = static_cast<const float*>(lse_.data());
    g.dout = dout_.data();
    g.dlse = static_cast<const float*>(dlse_.data());
    g.dq = at(grads_, 0), g.dk = at(grads_, views_.k_offset), g.dv = at(grads_, views_.v_offset);
    g.text_len = static_cast<const int32_t*>(text_len_.data());
    return g;
  }

  /// Poisons o and lse, then runs the forward (which the backward needs for o and lse).
  void forward(void* stream = nullptr) {
    o_.fill(0xFF, stream);
    lse_.fill(0xFF, stream);
    plan_.run(tensors(), stream);
  }
  /// Poisons dq, dk, dv and the workspace (the backward may not assume any content), then runs the backward.
  void poison_gradients(void* stream = nullptr) {
    grads_.fill(0xFF, stream);
    workspace_.fill(0xFF, stream);
  }
  void backward(bool deterministic, void* stream = nullptr) {
    poison_gradients(stream);
    plan_.run_backward(grad_tensors(), stream, workspace_.data(), deterministic);
  }

  /// Waits for the device, then reads everything back and counts what was left unwritten or written outside.
  Outputs read() const {
    synchronize(plan_.device());
    Outputs out;
    const std::vector<uint8_t> o_bytes = o_.download();
    out.grad_bytes = grads_.download();
    std::vector<bool> o_addressed(views_.out_size, false), grad_addressed(views_.in_size, false);
    out.values[kO] = gather(case_, views_.o, case_.q_heads, 0, o_bytes, dtype_, o_addressed);
    out.values[kDq] = gather(case_, views_.q, case_.q_heads, 0, out.grad_bytes, dtype_, grad_addressed);
    out.values[kDk] = gather(case_, views_.k, case_.kv_heads, views_.k_offset, out.grad_bytes, dtype_, grad_addressed);
    out.values[kDv] = gather(case_, views_.v, case_.kv_heads, views_.v_offset, out.grad_bytes, dtype_, grad_addressed);
    const std::vector<uint8_t> lse_bytes = lse_.download();
    out.values[kLse].resize(lse_bytes.size() / sizeof(float));
    for (size_t i = 0; i < out.values[kLse].size(); ++i)
      out.values[kLse][i] = oracle::load(oracle::Storage::f32, lse_bytes.data(), static_cast<int64_t>(i));
    for (int t = 0; t < kNumTensors; ++t)
      out.nonfinite[t] = std::count_if(out.values[t].begin(), out.values[t].end(), [](double x) { return !std::isfinite(x); });
    out.written_outside_views = changed_outside(o_bytes, o_addressed, esize_) +
                                changed_outside(out.grad_bytes, grad_addressed, esize_);
    return out;
  }

 private:
  void* at(const Buffer& b, int64_t element) const { return static_cast<char*>(b.data()) + element * esize_; }

  const tilewise::Plan& plan_;
  oracle::Case case_;
  oracle::Views views_;
  DType dtype_;
  int64_t esize_;
  Buffer qkv_, dout_, o_, lse_, grads_, dlse_, text_len_, workspace_;
};

/// Forward then backward of case `c` on `device` with inputs stored as `dtype` (the case's own type, or f64 for
/// the reference run on upcast inputs). Throws tilewise::Error where the plan or run refuses the problem.
inline Outputs run(const oracle::Case& c, DType dtype, Device device, const Inputs& in, bool deterministic = false) {
  const tilewise::Plan plan(problem_of(c, dtype), oracle::to_pattern(c), device);
  Workbench bench(plan, c, in);
  bench.forward();
  bench.backward(deterministic);
  return bench.read();
}

// ---- checks -----------------------------------------------------------------------------------------------

/// ||x - ref|| / ||ref|| over all elements (0 when both are zero).
inline double rel_l2(const std::vector<double>& x, const std::vector<double>& ref) {
  if (x.size() != ref.size()) return INFINITY;
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    err2 += (x[i] - ref[i]) * (x[i] - ref[i]);
    ref2 += ref[i] * ref[i];
  }
  if (ref2 == 0) return err2 == 0 ? 0.0 : INFINITY;
  return std::sqrt(err2 / ref2);
}

/// Index of the first element where two tensors differ bitwise as values (NaN counts as different), or -1.
inline int64_t first_difference(const std::vector<double>& a, const std::vector<double>& b) {
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    if (!(a[i] == b[i]) || std::signbit(a[i]) != std::signbit(b[i])) return static_cast<int64_t>(i);
  return a.size() == b.size() ? -1 : static_cast<int64_t>(std::min(a.size(), b.size()));
}

/// Gradient rows of keys that no query sees, which must be exactly zero: text padding keys always, and with
/// `full_mask` (small problems: it evaluates the independent oracle's mask pair by pair) every key that no query of
/// the kv head's group sees (block lists can leave whole key tiles unseen).
struct UnseenKeys {
  int64_t rows = 0;         // (b, key, kv head) rows checked
  int64_t nonzero = 0;      // of which dk or dv has a nonzero element
  std::string first_bad;    // where the first nonzero one is
};

inline UnseenKeys check_unseen_keys(const oracle::Case& c, const Outputs& out, bool full_mask) {
  const oracle::Problem p = oracle::to_oracle(c);
  const int64_t S = p.seq_len(), D = p.D, group = p.Hq / p.Hkv;
  const int64_t text0 = p.text_first ? 0 : p.num_video();
  std::vector<bool> seen(S);
  std::optional<oracle::Mask> mask;
  if (full_mask) mask.emplace(p);
  UnseenKeys r;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t g = 0; g < p.Hkv; ++g) {
      for (int64_t j = 0; j < S; ++j) {
        const bool text = j >= text0 && j < text0 + p.text_capacity;
        if (text) {
          seen[j] = j - text0 < p.valid_text(b);
        } else if (!full_mask) {
          seen[j] = true;
        } else {
          // Queries from the text part on: a text query sees every video key, so most scans stop at once.
          bool any = false;
          for (int64_t h = g * group; h < (g + 1) * group && !any; ++h)
            for (int64_t n = 0; n < S && !any; ++n) any = mask->allowed(b, h, (text0 + n) % S, j);
          seen[j] = any;
        }
      }
      for (int64_t j = 0; j < S; ++j) {
        if (seen[j]) continue;
        ++r.rows;
        const int64_t row = ((b * S + j) * p.Hkv + g) * D;
        bool zero = true;
        for (int64_t d = 0; d < D; ++d) zero = zero && out[kDk][row + d] == 0 && out[kDv][row + d] == 0;
        if (!zero && r.nonzero++ == 0)
          r.first_bad = "batch " + std::to_string(b) + " key position " + std::to_string(j) + " kv head " +
                        std::to_string(g) + (j >= text0 && j < text0 + p.text_capacity ? " (text padding)" : " (video)");
      }
    }
  return r;
}

/// One tensor's accuracy against the spec's rule.
struct Verdict {
  Tensor tensor = kO;
  double err = 0;          // relative L2 against the float64 run on the same (upcast) inputs
  double half_err = 0;     // the CPU run on the 16-bit inputs (f32 accumulation) against the same float64 run
  double bound = 0;        // 2 * half_err + floor: the spec's "no worse than twice a well-known kernel's error"
  double err_vs_half = 0;  // relative L2 against the CPU 16-bit run
  double tol_vs_half = 0;  // 1e-2, or 3 * half_err where the problem itself is that ill-conditioned
  bool ok = true;
  bool against_float64 = true;  // false: judged against another 16-bit run alone (judge_against)
  bool absolute = false;        // the float64 tensor is exactly zero: err is the largest |element|, bound absolute

  std::string describe() const {
    std::ostringstream s;
    s.precision(3);
    s << kTensorNames[tensor] << ": rel L2 " << err;
    if (absolute)
      return kTensorNames[tensor] + std::string(": exactly zero in float64, largest |element| ") + std::to_string(err) +
             " (bound " + std::to_string(bound) + ")";
    if (against_float64)
      s << " vs float64 (bound " << bound << " = 2 x the CPU 16-bit run's " << half_err << " + floor), " << err_vs_half
        << " vs the CPU 16-bit run (tolerance " << tol_vs_half << ")"
        << (half_err > 1e-2 ? "; the CPU 16-bit run itself is far from float64: ill-conditioned, or suspect the CPU "
                              "reference"
                            : "");
    else
      s << " vs the reference run (tolerance " << bound << ")";
    return s.str();
  }
};

/// Rounding-level slack added to twice the CPU run's error: half an ulp of 1 in the 16-bit type, for kernels
/// that round P and dS to 16 bits before their GEMMs (the CPU reference keeps them in f32).
inline double error_floor(DType dtype) { return dtype == DType::f16 ? std::ldexp(1.0, -12) : std::ldexp(1.0, -9); }

/// Judges every tensor of `got` (a 16-bit run on some device) against the CPU runs on the same inputs: `half`
/// (Device::cpu on the 16-bit inputs) and `exact` (Device::cpu in float64 on the upcast inputs).
/// o, dq, dk, dv: within 2x the CPU 16-bit run's error against float64 (+ floor), and within 1e-2 of that run.
/// lse (float32 everywhere): within 2x the CPU run's error + 1e-4.
inline std::array<Verdict, kNumTensors> judge(const Outputs& got, const Outputs& half, const Outputs& exact, DType dtype) {
  std::array<Verdict, kNumTensors> v;
  for (int t = 0; t < kNumTensors; ++t) {
    Verdict& x = v[t];
    x.tensor = static_cast<Tensor>(t);
    x.err = rel_l2(got[x.tensor], exact[x.tensor]);
    x.half_err = rel_l2(half[x.tensor], exact[x.tensor]);
    x.err_vs_half = rel_l2(got[x.tensor], half[x.tensor]);
    x.bound = 2 * x.half_err + (t == kLse ? 1e-4 : error_floor(dtype));
    x.tol_vs_half = t == kLse ? x.bound : std::max(1e-2, 3 * x.half_err);
    x.ok = x.err <= x.bound && x.err_vs_half <= x.tol_vs_half;
    if (std::all_of(exact[x.tensor].begin(), exact[x.tensor].end(), [](double e) { return e == 0; })) {
      // A gradient that is exactly zero (dq where every query sees one key and there is no dLSE: P = 1, dS =
      // dP - D = 0) has no relative error; a run computes dP and D in other orders, so it is zero up to their
      // rounding, with O(1) terms here.
      x.absolute = true;
      x.err = 0;
      for (double g : got[x.tensor]) x.err = std::max(x.err, std::abs(g));
      x.bound = x.tol_vs_half = 1e-3;
      x.err_vs_half = x.err;
      x.ok = x.err <= x.bound;
    }
  }
  return v;
}

/// Relative L2 of every tensor against a reference that is itself a 16-bit run (the GPU reference at full size).
inline std::array<Verdict, kNumTensors> judge_against(const Outputs& got, const Outputs& ref, double tol) {
  std::array<Verdict, kNumTensors> v;
  for (int t = 0; t < kNumTensors; ++t) {
    Verdict& x = v[t];
    x.tensor = static_cast<Tensor>(t);
    x.err = x.err_vs_half = rel_l2(got[x.tensor], ref[x.tensor]);
    x.bound = x.tol_vs_half = tol;
    x.ok = x.err <= tol;
    x.against_float64 = false;
  }
  return v;
}

/// Structural problems of one run, as lines (empty: none): unwritten or non-finite elements, writes outside the
/// views, nonzero gradients of unseen keys.
inline std::vector<std::string> structural_problems(const oracle::Case& c, const Outputs& out, bool full_mask) {
  std::vector<std::string> lines;
  for (int t = 0; t < kNumTensors; ++t)
    if (out.nonfinite[t] > 0)
      lines.push_back(std::string(kTensorNames[t]) + ": " + std::to_string(out.nonfinite[t]) + " of " +
                      std::to_string(out.values[t].size()) + " elements not finite (unwritten: still the NaN poison)");
  if (out.written_outside_views > 0)
    lines.push_back(std::to_string(out.written_outside_views) +
                    " elements outside the o/dq/dk/dv views changed (written past the strided views)");
  const UnseenKeys u = check_unseen_keys(c, out, full_mask);
  if (u.nonzero > 0)
    lines.push_back("dk/dv of keys no query sees not zero in " + std::to_string(u.nonzero) + " of " +
                    std::to_string(u.rows) + " rows, first at " + u.first_bad);
  return lines;
}

/// Whether the full pair-by-pair mask check is affordable (B * Hq * S^2 mask evaluations at most).
inline bool small_enough_for_full_mask(const oracle::Case& c) {
  const double pairs = double(c.batch) * c.q_heads * c.seq_len() * c.seq_len();
  return pairs <= 2e8;
}

}  // namespace gradcheck
