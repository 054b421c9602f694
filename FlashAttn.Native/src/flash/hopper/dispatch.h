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

// Whether the Hopper kernels take dropout: FLASHATTN_HOPPER_DROPOUT=1 (read once per process) until
// the device has verified them; otherwise dropout runs on the sm_80 kernels.
inline bool dropout_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FLASHATTN_HOPPER_DROPOUT");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
