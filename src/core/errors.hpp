// Internal helpers to build tilewise::Error messages: "invalid <argument> = <value>: expected <expected>".
#pragma once

#include <sstream>
#include <string>

#include "tilewise/tilewise.hpp"

namespace tilewise::detail {

inline std::string str(const Dim3& d) {
  std::ostringstream s;
  s << d.t << "x" << d.h << "x" << d.w;
  return s.str();
}
template <class T>
std::string str(const T& v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

[[noreturn]] inline void fail(const std::string& argument, const std::string& value, const std::string& expected) {
  throw Error(argument, value, expected);
}

/// Throws unless `ok`; the value is formatted only on failure.
template <class T>
void require(bool ok, const std::string& argument, const T& value, const std::string& expected) {
  if (!ok) fail(argument, str(value), expected);
}

}  // namespace tilewise::detail
