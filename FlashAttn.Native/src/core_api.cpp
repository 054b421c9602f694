// The Core area of the C ABI: version, errors, build flavour, device queries.
#include "common/device.h"
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
