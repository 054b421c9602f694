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

// Whether the Hopper kernels take dropout: yes unless FLASHATTN_HOPPER_DROPOUT=0 (read once per process), which
// sends dropout to the sm_80 kernels (the same Philox stream: a GPT-2 run's losses agree to rounding either way).
inline bool dropout_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FLASHATTN_HOPPER_DROPOUT");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
