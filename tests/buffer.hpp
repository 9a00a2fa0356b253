// Host buffers of one storage type for the CPU tests, and visiting the elements of a strided view.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "oracle_case.hpp"

namespace oracle {

/// A host buffer of one storage type, with the exact value of every element as a double.
struct Buffer {
  Storage st;
  std::vector<unsigned char> raw;

  Buffer(Storage s, int64_t n) : st(s), raw(n * storage_size(s)) {}
  int64_t size() const { return static_cast<int64_t>(raw.size()) / storage_size(st); }
  void* ptr(int64_t offset = 0) { return raw.data() + offset * storage_size(st); }
  const void* ptr(int64_t offset = 0) const { return raw.data() + offset * storage_size(st); }
  double at(int64_t i) const { return load(st, raw.data(), i); }
  void set(int64_t i, double x) { store(st, raw.data(), i, x); }
  void fill(double x) {
    for (int64_t i = 0; i < size(); ++i) set(i, x);
  }
  std::vector<double> values() const {
    std::vector<double> v(size());
    for (int64_t i = 0; i < size(); ++i) v[i] = at(i);
    return v;
  }
  void randomize(Rng& rng) {
    std::uniform_real_distribution<double> dist(-2.0, 2.0);
    for (int64_t i = 0; i < size(); ++i) set(i, dist(rng));
  }
};

/// Random inputs for every element of a case's input buffer (gaps of strided views included).
inline Buffer random_inputs(const Case& c, Rng& rng) {
  Buffer in(storage_of(c.dtype), make_views(c).in_size);
  in.randomize(rng);
  return in;
}

/// A library run's output and lse, and the oracle's, on the same inputs.
struct Outputs {
  Buffer o;
  std::vector<float> lse;
  std::vector<double> ref_o, ref_lse;
};

/// Visits the element index of every (b, s, h, d) of a view with `heads` heads.
template <class F>
void for_each_element(const Case& c, const Strides3& s, int64_t heads, F&& f) {
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t i = 0; i < c.seq_len(); ++i)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < c.head_dim; ++d) f(b * s.batch + i * s.seq + h * s.head + d);
}

}  // namespace oracle
