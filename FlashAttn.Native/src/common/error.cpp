// Thread-local last error of the C ABI.
#include "common/error.h"

#include <cstdio>

namespace flashattn {

namespace {
thread_local std::string t_last_error;
}

FlashAttnStatus fail(FlashAttnStatus status, const char* function, const char* format, ...) {
  char message[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof(message), format, args);
  va_end(args);
  try {
    t_last_error = std::string(function) + ": " + message;
  } catch (...) {
    // Out of memory while recording an error: keep the status, lose the text.
  }
  return status;
}

const char* last_error() { return t_last_error.c_str(); }

void clear_error() { t_last_error.clear(); }

}  // namespace flashattn
