#include "parallm/comm/stats.h"

#include <cstdio>
#include <map>
#include <ostream>

namespace parallm::comm {

std::string_view kind_name(Kind kind) {
  switch (kind) {
    case Kind::AllReduce:
      return "all_reduce";
    case Kind::AllGather:
      return "all_gather";
    case Kind::ReduceScatter:
      return "reduce_scatter";
    case Kind::AllToAll:
      return "all_to_all";
    case Kind::Broadcast:
      return "broadcast";
    case Kind::Send:
      return "send";
    case Kind::Recv:
      return "recv";
    case Kind::Barrier:
      return "barrier";
    case Kind::Split:
      return "split";
  }
  return "?";
}

KindStats CommStats::get(Kind kind) const {
  const Counters& c = counters_[static_cast<int>(kind)];
  KindStats s;
  s.calls = c.calls.load(std::memory_order_relaxed);
  s.bytes_sent = c.bytes_sent.load(std::memory_order_relaxed);
  s.bytes_recv = c.bytes_recv.load(std::memory_order_relaxed);
  s.seconds = c.nanos.load(std::memory_order_relaxed) * 1e-9;
  return s;
}

KindStats CommStats::total() const {
  KindStats t;
  for (int k = 0; k < kKindCount; ++k) {
    KindStats s = get(static_cast<Kind>(k));
    t.calls += s.calls;
    t.bytes_sent += s.bytes_sent;
    t.bytes_recv += s.bytes_recv;
    t.seconds += s.seconds;
  }
  return t;
}

void CommStats::reset() {
  for (Counters& c : counters_) {
    c.calls.store(0, std::memory_order_relaxed);
    c.bytes_sent.store(0, std::memory_order_relaxed);
    c.bytes_recv.store(0, std::memory_order_relaxed);
    c.nanos.store(0, std::memory_order_relaxed);
  }
}

void CommStats::print(std::ostream& out) const {
  char line[160];
  for (int k = 0; k < kKindCount; ++k) {
    KindStats s = get(static_cast<Kind>(k));
    if (s.calls == 0) continue;
    std::snprintf(line, sizeof line, "%-8s %-15s %10llu %12.3f %12.3f %10.4f\n", name_.c_str(),
                  std::string(kind_name(static_cast<Kind>(k))).c_str(),
                  static_cast<unsigned long long>(s.calls), s.bytes_sent / 1e6, s.bytes_recv / 1e6,
                  s.seconds);
    out << line;
  }
}

std::shared_ptr<CommStats> StatsRegistry::make(std::string group_name, int group_size,
                                               int world_rank) {
  auto s = std::make_shared<CommStats>(std::move(group_name), group_size, world_rank);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.push_back(s);
  return s;
}

std::vector<std::shared_ptr<CommStats>> StatsRegistry::all() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void print_stats_table(std::ostream& out, const std::vector<std::shared_ptr<CommStats>>& stats) {
  struct Row {
    int instances = 0;
    KindStats sum;
  };
  // (group name, kind) -> sums; std::map keeps the table sorted by name, then kind order.
  std::map<std::pair<std::string, int>, Row> rows;
  std::map<std::string, int> instances;
  for (const auto& s : stats) {
    instances[s->name()] += 1;
    for (int k = 0; k < kKindCount; ++k) {
      KindStats ks = s->get(static_cast<Kind>(k));
      if (ks.calls == 0) continue;
      Row& r = rows[{s->name(), k}];
      r.sum.calls += ks.calls;
      r.sum.bytes_sent += ks.bytes_sent;
      r.sum.bytes_recv += ks.bytes_recv;
      r.sum.seconds += ks.seconds;
    }
  }
  char line[200];
  std::snprintf(line, sizeof line, "%-8s %-15s %9s %12s %12s %12s %10s %9s\n", "group", "kind",
                "instances", "calls/inst", "MB sent/inst", "MB recv/inst", "s/inst", "GB/s");
  out << "comm stats (per group instance = one rank's view of one group)\n" << line;
  for (const auto& [key, r] : rows) {
    const int n = instances[key.first];
    const double calls = double(r.sum.calls) / n, sent = r.sum.bytes_sent / 1e6 / n,
                 recv = r.sum.bytes_recv / 1e6 / n, secs = r.sum.seconds / n;
    const double gbps = secs > 0 ? (sent + recv) / 2 / 1e3 / secs : 0.0;
    std::snprintf(line, sizeof line, "%-8s %-15s %9d %12.1f %12.3f %12.3f %10.4f %9.2f\n",
                  key.first.c_str(), std::string(kind_name(static_cast<Kind>(key.second))).c_str(),
                  n, calls, sent, recv, secs, gbps);
    out << line;
  }
}

}  // namespace parallm::comm
