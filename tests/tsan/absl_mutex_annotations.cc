// Linked into every target of a MUON_TSAN build (CMakeLists.txt): tells
// ThreadSanitizer about absl::Mutex, CondVar and Notification. Debian's
// Abseil is not built with TSAN, so its Mutex's locking is invisible to it
// and every access a Mutex guards would look like a race. This file defines
// their entry points (the executable's definitions take the place of
// libabsl's, also for libabsl's and gRPC's own calls, which go through the
// PLT), brackets each with TSAN's annotations and forwards to Abseil's
// through dlsym(RTLD_NEXT). Destruction is not annotated: TSAN forgets a
// heap mutex when its memory is freed, and gRPC's own mutexes die on threads
// whose ordering TSAN cannot see.

#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace {

#define MUON_STR2(x) #x
#define MUON_STR(x) MUON_STR2(x)

// Abseil's own definition of `member` (the mangled name after
// "_ZN[K]4absl<inline namespace>"), e.g. "5Mutex4LockEv"; K for a const one.
template <typename Fn>
Fn Real(const char* member, bool is_const = false) {
  const char* ns = MUON_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name = std::string(is_const ? "_ZNK4absl" : "_ZN4absl") +
                           std::to_string(std::strlen(ns)) + ns + member;
  void* fn = dlsym(RTLD_NEXT, name.c_str());
  if (fn == nullptr) {
    std::fprintf(stderr, "absl_mutex_annotations: no %s in Abseil\n", name.c_str());
    std::abort();
  }
  return reinterpret_cast<Fn>(fn);
}

using Condition = absl::Condition;
using Duration = absl::Duration;
using Mutex = absl::Mutex;
using Time = absl::Time;

constexpr unsigned kRead = __tsan_mutex_read_lock;

// Abseil's entry points call each other (AwaitWithTimeout calls
// AwaitWithDeadline through the PLT, so into this file again): only the
// outermost call on an object annotates.
thread_local const void* annotating = nullptr;
class Outermost {
 public:
  explicit Outermost(const void* object)
      : outer_(annotating != object), saved_(annotating) {
    annotating = object;
  }
  ~Outermost() { annotating = saved_; }
  explicit operator bool() const { return outer_; }

 private:
  const bool outer_;
  const void* const saved_;
};

void Locked(Mutex* mu, unsigned flags) { __tsan_mutex_post_lock(mu, flags, 0); }

// A wait releases the lock inside Abseil and takes it again: told to TSAN as
// an unlock before and a lock after, so other threads may hold it meanwhile.
void Unlocking(Mutex* mu, unsigned flags) {
  __tsan_mutex_pre_unlock(mu, flags);
  __tsan_mutex_post_unlock(mu, flags);
}
void Relocked(Mutex* mu, unsigned flags) {
  __tsan_mutex_pre_lock(mu, flags);
  __tsan_mutex_post_lock(mu, flags, 0);
}

// A condition as Abseil evaluates it: under the real lock, on whichever
// thread holds it then (a waiter, or the thread unlocking), which TSAN may
// not count as holding it. The evaluation acquires and releases the mutex's
// synchronization for TSAN.
struct Annotated {
  const Condition* cond;
  Mutex* mu;
  static bool Eval(Annotated* a) {
    __tsan_acquire(a->mu);
    const bool met = a->cond->Eval();
    __tsan_release(a->mu);
    return met;
  }
  Condition condition() { return Condition(&Annotated::Eval, this); }
};

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex4LockEv");
  Outermost outer(this);
  if (outer) __tsan_mutex_pre_lock(this, 0);
  real(this);
  if (outer) Locked(this, 0);
}

void Mutex::ReaderLock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex10ReaderLockEv");
  Outermost outer(this);
  if (outer) __tsan_mutex_pre_lock(this, kRead);
  real(this);
  if (outer) Locked(this, kRead);
}

void Mutex::Unlock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex6UnlockEv");
  Outermost outer(this);
  if (outer) __tsan_mutex_pre_unlock(this, 0);
  real(this);
  if (outer) __tsan_mutex_post_unlock(this, 0);
}

void Mutex::ReaderUnlock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex12ReaderUnlockEv");
  Outermost outer(this);
  if (outer) __tsan_mutex_pre_unlock(this, kRead);
  real(this);
  if (outer) __tsan_mutex_post_unlock(this, kRead);
}

bool Mutex::TryLock() {
  static auto real = Real<bool (*)(Mutex*)>("5Mutex7TryLockEv");
  Outermost outer(this);
  if (outer) __tsan_mutex_pre_lock(this, __tsan_mutex_try_lock);
  const bool locked = real(this);
  if (outer) {
    __tsan_mutex_post_lock(
        this, __tsan_mutex_try_lock | (locked ? 0 : __tsan_mutex_try_lock_failed), 0);
  }
  return locked;
}

bool Mutex::ReaderTryLock() {
  static auto real = Real<bool (*)(Mutex*)>("5Mutex13ReaderTryLockEv");
  const unsigned flags = kRead | __tsan_mutex_try_lock;
  Outermost outer(this);
  if (outer) __tsan_mutex_pre_lock(this, flags);
  const bool locked = real(this);
  if (outer) __tsan_mutex_post_lock(this, flags | (locked ? 0 : __tsan_mutex_try_lock_failed), 0);
  return locked;
}

void Mutex::LockWhen(const Condition& cond) {
  static auto real = Real<void (*)(Mutex*, const Condition&)>("5Mutex8LockWhenERKNS0_9ConditionE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) __tsan_mutex_pre_lock(this, 0);
  real(this, wrapped);
  if (outer) Locked(this, 0);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static auto real = Real<void (*)(Mutex*, const Condition&)>(
      "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) __tsan_mutex_pre_lock(this, kRead);
  real(this, wrapped);
  if (outer) Locked(this, kRead);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) __tsan_mutex_pre_lock(this, 0);
  const bool result = real(this, wrapped, timeout);
  if (outer) Locked(this, 0);
  return result;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) __tsan_mutex_pre_lock(this, 0);
  const bool result = real(this, wrapped, deadline);
  if (outer) Locked(this, 0);
  return result;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) __tsan_mutex_pre_lock(this, kRead);
  const bool result = real(this, wrapped, timeout);
  if (outer) Locked(this, kRead);
  return result;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) __tsan_mutex_pre_lock(this, kRead);
  const bool result = real(this, wrapped, deadline);
  if (outer) Locked(this, kRead);
  return result;
}

void Mutex::Await(const Condition& cond) {
  static auto real = Real<void (*)(Mutex*, const Condition&)>("5Mutex5AwaitERKNS0_9ConditionE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) Unlocking(this, 0);
  real(this, wrapped);
  if (outer) Relocked(this, 0);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, Duration)>(
      "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) Unlocking(this, 0);
  const bool result = real(this, wrapped, timeout);
  if (outer) Relocked(this, 0);
  return result;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, Time)>(
      "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outermost outer(this);
  Annotated annotated{&cond, this};
  const Condition wrapped = outer ? annotated.condition() : cond;
  if (outer) Unlocking(this, 0);
  const bool result = real(this, wrapped, deadline);
  if (outer) Relocked(this, 0);
  return result;
}

void CondVar::Wait(Mutex* mu) {
  static auto real = Real<void (*)(CondVar*, Mutex*)>("7CondVar4WaitEPNS0_5MutexE");
  Outermost outer(this);
  if (outer) Unlocking(mu, 0);
  real(this, mu);
  if (outer) Relocked(mu, 0);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  static auto real = Real<bool (*)(CondVar*, Mutex*, Duration)>(
      "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Outermost outer(this);
  if (outer) Unlocking(mu, 0);
  const bool timed_out = real(this, mu, timeout);
  if (outer) Relocked(mu, 0);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  static auto real = Real<bool (*)(CondVar*, Mutex*, Time)>(
      "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Outermost outer(this);
  if (outer) Unlocking(mu, 0);
  const bool timed_out = real(this, mu, deadline);
  if (outer) Relocked(mu, 0);
  return timed_out;
}

// Notification's fast path reads an atomic flag libabsl stored: TSAN sees
// neither, so Notify releases and a wait that saw it acquires.
void Notification::Notify() {
  static auto real = Real<void (*)(Notification*)>("12Notification6NotifyEv");
  __tsan_release(this);
  real(this);
}

void Notification::WaitForNotification() const {
  static auto real =
      Real<void (*)(const Notification*)>("12Notification19WaitForNotificationEv", true);
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  static auto real = Real<bool (*)(const Notification*, Duration)>(
      "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE", true);
  const bool notified = real(this, timeout);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(Time deadline) const {
  static auto real = Real<bool (*)(const Notification*, Time)>(
      "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE", true);
  const bool notified = real(this, deadline);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl
