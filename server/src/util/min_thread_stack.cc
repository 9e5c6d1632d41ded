// Debian's civetweb (under prometheus-cpp's /metrics endpoint) fixes its
// threads' stacks at about 100 KiB. glibc places every loaded library's static
// TLS in each thread's stack, and with cuBLASLt (~92 KiB) and OpenBLAS
// (~60 KiB) in the process that no longer fits: pthread_create fails with
// EINVAL and /metrics cannot start. Interposing pthread_attr_setstacksize in
// the executable raises such small requests to a size that fits; larger
// requests pass through unchanged.
#include <dlfcn.h>
#include <pthread.h>

#include <cstddef>

namespace {

constexpr size_t kMinStackBytes = size_t{1} << 20;

using SetStackSize = int (*)(pthread_attr_t*, size_t);

SetStackSize RealSetStackSize() {
  static const auto real =
      reinterpret_cast<SetStackSize>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  return real;
}

}  // namespace

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  return RealSetStackSize()(attr, size < kMinStackBytes ? kMinStackBytes : size);
}
