// The error convention of every native shim: a C function returns 0 on success, or 1 with the
// message in `err` (C++ exceptions must not cross into Rust; `train/native/mod.rs` turns this
// into an `anyhow::Error`).
#pragma once

#include <c10/util/Exception.h>

#include <cstring>
#include <exception>
#include <string>

namespace clover_native {

inline void copy_message(const std::string& message, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, message.c_str(), err_len - 1);
  err[err_len - 1] = '\0';
}

// Runs `body`, turning any exception into the 0/1 + message convention.
template <typename F>
int guarded(F&& body, char* err, size_t err_len) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    // what() of a c10::Error carries a C++ backtrace; the message alone is what a user needs.
    copy_message(e.msg(), err, err_len);
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
  } catch (...) {
    copy_message("unknown C++ exception", err, err_len);
  }
  return 1;
}

}  // namespace clover_native
