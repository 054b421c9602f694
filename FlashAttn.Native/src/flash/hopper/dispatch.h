// What the Hopper forward and backward dispatches share, on the host: environment switches.
#pragma once

#include <cstdlib>
#include <cstring>

namespace flashattn {
namespace flash {
namespace hopper {

// Whether environment variable `name` is "0".
inline bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
