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

// Whether the persistent forward without dropout runs a causal diagonal key block's P V over its first half of keys
// for a warpgroup whose rows see none of the second half (the kernel's kHalfDiag): FLASHATTN_HOPPER_FWD_HALF_DIAG=1
// (read once per process); off by default until the H200 has measured it (hopper/NOTES.md, "Half diagonal blocks").
inline bool fwd_half_diag() {
  static const bool on = [] {
    const char* v = std::getenv("FLASHATTN_HOPPER_FWD_HALF_DIAG");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

}  // namespace hopper
}  // namespace flash
}  // namespace flashattn
