#include "parallm/engine/serve_plan.h"

#include <cstring>

#include "parallm/core/error.h"

namespace parallm {
namespace {

constexpr int kHead = 4, kPerEntry = 13;

int64_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(int64_t v) {
  const uint32_t u = static_cast<uint32_t>(v);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

int64_t ServePlan::tokens() const {
  int64_t t = 0;
  for (const ServeEntry& e : entries) t += e.n_tokens;
  return t;
}

int ServePlan::samples() const {
  int n = 0;
  for (const ServeEntry& e : entries) n += e.sample;
  return n;
}

int64_t ServePlan::blocks() const {
  int64_t n = 0;
  for (const ServeEntry& e : entries) n += static_cast<int64_t>(e.blocks.size());
  return n;
}

int64_t ServePlan::targets() const {
  int64_t n = 0;
  for (const ServeEntry& e : entries) n += static_cast<int64_t>(e.targets.size());
  return n;
}

std::vector<SeqChunk> ServePlan::chunks() const {
  std::vector<SeqChunk> out;
  out.reserve(entries.size());
  for (const ServeEntry& e : entries) out.push_back({e.slot, e.start_pos, e.n_tokens});
  return out;
}

// [exit, entries, blocks, ids, per entry (slot, start, n, flags, temperature, top_p, top_k, seed,
//  rng_skip, top_logprobs, n_blocks, lp_first, n_targets), blocks..., targets..., ids...]
std::vector<int64_t> ServePlan::encode(bool with_ids) const {
  const size_t n_ids = with_ids ? ids.size() : 0;
  std::vector<int64_t> v;
  v.reserve(kHead + kPerEntry * entries.size() + blocks() + targets() + n_ids);
  v.push_back(exit ? 1 : 0);
  v.push_back(static_cast<int64_t>(entries.size()));
  v.push_back(blocks());
  v.push_back(static_cast<int64_t>(n_ids));
  for (const ServeEntry& e : entries) {
    v.push_back(e.slot);
    v.push_back(e.start_pos);
    v.push_back(e.n_tokens);
    v.push_back((e.sample ? 1 : 0) | (e.init ? 2 : 0));
    v.push_back(float_bits(e.sampling.temperature));
    v.push_back(float_bits(e.sampling.top_p));
    v.push_back(e.sampling.top_k);
    v.push_back(static_cast<int64_t>(e.sampling.seed));
    v.push_back(e.rng_skip);
    v.push_back(e.top_logprobs);
    v.push_back(static_cast<int64_t>(e.blocks.size()));
    v.push_back(e.lp_first);
    v.push_back(static_cast<int64_t>(e.targets.size()));
  }
  for (const ServeEntry& e : entries) v.insert(v.end(), e.blocks.begin(), e.blocks.end());
  for (const ServeEntry& e : entries) v.insert(v.end(), e.targets.begin(), e.targets.end());
  for (size_t k = 0; k < n_ids; ++k) v.push_back(ids[k]);
  return v;
}

ServePlan ServePlan::decode(const int64_t* v, size_t n) {
  auto bad = [&](const char* why) {
    fail<std::runtime_error>("serve-plan", "malformed plan (", why, "): ", n, " values, header (",
                             n > 0 ? v[0] : -1, ", ", n > 1 ? v[1] : -1, ", ", n > 2 ? v[2] : -1,
                             ", ", n > 3 ? v[3] : -1, ")");
  };
  if (n < static_cast<size_t>(kHead) || v[1] < 0 || v[2] < 0 || v[3] < 0) bad("header");
  const int64_t ne = v[1], nb = v[2], ni = v[3];
  if (static_cast<uint64_t>(kHead + kPerEntry * ne + nb + ni) > n) bad("sizes");
  int64_t nt = 0;
  for (int64_t k = 0; k < ne; ++k) {
    const int64_t t = v[kHead + kPerEntry * k + 12];
    if (t < 0) bad("target counts");
    nt += t;
  }
  if (static_cast<uint64_t>(kHead + kPerEntry * ne + nb + nt + ni) > n) bad("sizes");
  ServePlan p;
  p.exit = v[0] != 0;
  p.entries.resize(ne);
  const int64_t* e = v + kHead;
  const int64_t* b = e + kPerEntry * ne;
  int64_t blocks_left = nb;
  for (ServeEntry& x : p.entries) {
    x.slot = static_cast<int>(e[0]);
    x.start_pos = e[1];
    x.n_tokens = e[2];
    x.sample = (e[3] & 1) != 0;
    x.init = (e[3] & 2) != 0;
    x.sampling.temperature = bits_float(e[4]);
    x.sampling.top_p = bits_float(e[5]);
    x.sampling.top_k = static_cast<int>(e[6]);
    x.sampling.seed = static_cast<uint64_t>(e[7]);
    x.rng_skip = e[8];
    x.top_logprobs = static_cast<int>(e[9]);
    if (e[10] < 0 || e[10] > blocks_left) bad("block counts");
    x.blocks.assign(b, b + e[10]);
    b += e[10];
    blocks_left -= e[10];
    x.lp_first = e[11];
    e += kPerEntry;
  }
  if (blocks_left != 0) bad("block counts");
  e = v + kHead;
  for (ServeEntry& x : p.entries) {
    x.targets.assign(b, b + e[12]);
    b += e[12];
    e += kPerEntry;
  }
  p.ids.assign(b, b + ni);
  return p;
}

int64_t ServePlan::wire_size(int64_t max_entries, int64_t max_blocks, int64_t max_ids,
                             int64_t max_targets) {
  return kHead + kPerEntry * max_entries + max_blocks + max_ids + max_targets;
}

void broadcast_serve_plan(ServePlan& plan, const comm::Group& tp, int root, int64_t max_entries,
                          int64_t max_blocks, int64_t max_ids) {
  if (tp.rank() == root && (static_cast<int64_t>(plan.entries.size()) > max_entries ||
                            plan.blocks() > max_blocks || plan.targets() > max_ids ||
                            static_cast<int64_t>(plan.ids.size()) > max_ids))
    fail<std::logic_error>("serve-plan", "plan of ", plan.entries.size(), " entries, ",
                           plan.blocks(), " blocks and ", plan.ids.size(),
                           " ids exceeds the limits (", max_entries, ", ", max_blocks, ", ",
                           max_ids, ")");
  if (tp.size() == 1) return;
  std::vector<int64_t> wire(ServePlan::wire_size(max_entries, max_blocks, max_ids, max_ids), 0);
  if (tp.rank() == root) {
    const std::vector<int64_t> v = plan.encode(true);
    std::copy(v.begin(), v.end(), wire.begin());
  }
  tp.broadcast(wire.data(), wire.size(), DType::I64, root);
  if (tp.rank() != root) plan = ServePlan::decode(wire.data(), wire.size());
}

}  // namespace parallm
