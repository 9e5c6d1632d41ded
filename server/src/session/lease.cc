#include "session/lease.h"

#include <utility>

#include "session/session.h"

namespace muon::server {

Lease::Lease(Lease&& other) noexcept
    : session_(std::exchange(other.session_, nullptr)), purpose_(other.purpose_) {}

Lease& Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    Release();
    session_ = std::exchange(other.session_, nullptr);
    purpose_ = other.purpose_;
  }
  return *this;
}

Lease::~Lease() { Release(); }

void Lease::CommitStep(uint32_t worker, std::shared_ptr<const StepRecord> record) {
  std::exchange(session_, nullptr)->EndLeaseCommitted(record->step, [&](auto& last) {
    last[worker] = std::move(record);
  });
}

void Lease::CommitRound(uint64_t step, std::vector<std::shared_ptr<const StepRecord>> records) {
  std::exchange(session_, nullptr)->EndLeaseCommitted(step, [&](auto& last) {
    const size_t workers = last.size();
    last = std::move(records);
    last.resize(workers);
  });
}

void Lease::Release() {
  if (session_ != nullptr) std::exchange(session_, nullptr)->EndLease();
}

}  // namespace muon::server
