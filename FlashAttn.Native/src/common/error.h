// Thread-local last error and the guards every ABI function uses: nothing throws across the ABI,
// nothing exits; a failure returns a status and leaves a message naming function and argument.
#pragma once

#include <cstdarg>
#include <string>

#include "flashattn.h"

namespace flashattn {

// Records "<function>: <message>" as this thread's last error and returns `status`.
FlashAttnStatus fail(FlashAttnStatus status, const char* function, const char* format, ...)
    __attribute__((format(printf, 3, 4)));

// The message of the last failure on this thread ("" when none).
const char* last_error();
void clear_error();

// Thrown inside the library only (never across the ABI): the ABI guard turns it into a status.
struct Error {
  FlashAttnStatus status;
  std::string message;
};

// Runs `body` (returning FlashAttnStatus) and converts any escaping exception into a status.
template <typename F>
FlashAttnStatus guard(const char* function, F&& body) noexcept {
  try {
    clear_error();
    return body();
  } catch (const Error& e) {
    return fail(e.status, function, "%s", e.message.c_str());
  } catch (const std::exception& e) {
    return fail(FLASHATTN_STATUS_INTERNAL, function, "internal error: %s", e.what());
  } catch (...) {
    return fail(FLASHATTN_STATUS_INTERNAL, function, "internal error: unknown exception");
  }
}

}  // namespace flashattn

// Argument check used at the ABI: FA_CHECK(batch >= 0, "batch (%lld) must be >= 0", (long long)batch).
// Returns FLASHATTN_STATUS_INVALID_ARGUMENT from the enclosing function; needs `kFunction` in scope.
#define FA_CHECK(cond, ...)                                                              \
  do {                                                                                   \
    if (!(cond)) return ::flashattn::fail(FLASHATTN_STATUS_INVALID_ARGUMENT, kFunction, \
                                          __VA_ARGS__);                                  \
  } while (0)
