#ifndef MUON_CLIENT_SRC_STATS_H_
#define MUON_CLIENT_SRC_STATS_H_

// Latency samples and their percentiles, for muonctl's reports.

#include <cstddef>
#include <vector>

namespace muon::muonctl {

// A bag of samples. Not thread-safe: keep one per thread and Merge.
class Samples {
 public:
  void Add(double value) { values_.push_back(value); }
  void Merge(const Samples& other);
  size_t count() const { return values_.size(); }
  double Sum() const;
  double Mean() const;  // 0 when empty
  // The p-th percentile, p in [0, 100], by linear interpolation between the
  // closest ranks (numpy's default); 0 when empty.
  double Percentile(double p) const;

 private:
  std::vector<double> values_;
};

}  // namespace muon::muonctl

#endif  // MUON_CLIENT_SRC_STATS_H_
