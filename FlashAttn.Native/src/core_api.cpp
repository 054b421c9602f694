// The Core area of the C ABI: version, errors, build flavour, device queries.
#include "common/device.h"
#include "common/device_error.h"
#include "common/error.h"

using namespace flashattn;

FLASHATTN_API int32_t FlashAttn_core_abi_version(void) { return FLASHATTN_ABI_VERSION; }

FLASHATTN_API const char* FlashAttn_core_last_error(void) { return last_error(); }

FLASHATTN_API void FlashAttn_core_clear_error(void) { clear_error(); }

FLASHATTN_API int32_t FlashAttn_core_has_cuda(void) { return FLASHATTN_WITH_CUDA; }

FLASHATTN_API const char* FlashAttn_core_build_info(void) { return build_info(); }

FLASHATTN_API FlashAttnStatus FlashAttn_core_device_capability(int32_t device, int32_t* capability) {
  static constexpr const char* kFunction = "FlashAttn_core_device_capability";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(capability != nullptr, "capability must not be NULL");
    FA_CHECK(device >= 0, "device (%d) must be >= 0", device);
    return device_capability(device, capability, kFunction);
  });
}

FLASHATTN_API FlashAttnStatus FlashAttn_core_device_error(int32_t clear, int32_t* check, int64_t* index, int64_t* value) {
  static constexpr const char* kFunction = "FlashAttn_core_device_error";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(clear == 0 || clear == 1, "clear (%d) must be 0 or 1", clear);
    FA_CHECK(check != nullptr && index != nullptr && value != nullptr, "check, index and value must not be NULL");
    read_device_error(clear != 0, check, index, value);
    return FLASHATTN_STATUS_OK;
  });
}

FLASHATTN_API FlashAttnStatus FlashAttn_core_device_check(const uint8_t* ok, int64_t n, int32_t check, void* stream) {
  static constexpr const char* kFunction = "FlashAttn_core_device_check";
  return guard(kFunction, [&]() -> FlashAttnStatus {
    FA_CHECK(n >= 0, "n (%lld) must be >= 0", (long long)n);
    FA_CHECK(check >= FLASHATTN_DEVICE_CHECK_CALLER, "check (%d) must be >= FLASHATTN_DEVICE_CHECK_CALLER (%d)", check,
             int(FLASHATTN_DEVICE_CHECK_CALLER));
    if (n == 0) return FLASHATTN_STATUS_OK;
    FA_CHECK(ok != nullptr, "ok must not be NULL");
    return run_device_check(ok, n, check, stream, kFunction);
  });
}
