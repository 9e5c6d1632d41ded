#ifndef MUON_SERVER_SRC_SESSION_LEASE_H_
#define MUON_SERVER_SRC_SESSION_LEASE_H_

// The session's single in-flight slot, held. A session runs one thing at a
// time that reads or moves its engine state: a step, a parameter-server
// round, a weights upload, a checkpoint or added parameters. Each takes the slot as a Lease
// (Session::AdmitStep, TryLease, AwaitLease) and gives it back by ending the
// lease: Commit* moves the session's step on, anything else (Release, a
// move-assignment over it, its destructor) leaves the step unchanged. So
// every early return and error path frees the slot without a matching End
// call.

#include <cstdint>
#include <memory>
#include <vector>

namespace muon::server {

class Session;
struct StepRecord;

// What a lease holds the slot for; it names the holder in the errors other
// callers get meanwhile.
enum class LeasePurpose { kStep, kRound, kWeightsUpload, kCheckpoint, kAddParams };

// Move-only. Not thread-safe itself (one owner at a time); the session it
// holds is. The session must outlive the lease.
class Lease {
 public:
  // Holds nothing.
  Lease() = default;
  Lease(Lease&& other) noexcept;
  // Ends what this held (step unchanged), then takes `other`'s.
  Lease& operator=(Lease&& other) noexcept;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  // Ends the lease with the session's step unchanged.
  ~Lease();

  bool held() const { return session_ != nullptr; }
  explicit operator bool() const { return held(); }
  // REQUIRES: held().
  LeasePurpose purpose() const { return purpose_; }

  // Ends the lease with `record` committed for `worker`: the session's step
  // becomes record->step, and a retry of that step by `worker` is answered
  // from the record. REQUIRES: held() for kStep.
  void CommitStep(uint32_t worker, std::shared_ptr<const StepRecord> record);
  // Ends the lease with `step` committed, with one record per worker (null
  // where none). REQUIRES: held() for kRound.
  void CommitRound(uint64_t step, std::vector<std::shared_ptr<const StepRecord>> records);
  // Ends the lease now, step unchanged; nothing when not held.
  void Release();

 private:
  friend class Session;
  Lease(Session* session, LeasePurpose purpose) : session_(session), purpose_(purpose) {}

  Session* session_ = nullptr;
  LeasePurpose purpose_ = LeasePurpose::kStep;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_SESSION_LEASE_H_
