// The collective conformance suite, shared by the local backend's tests (ranks as threads) and the
// MPI tests (run under mpirun). Each check runs inside one rank and throws CheckFailure naming the
// call, rank, element, expected and actual value; launch carries it to the test.
//
// Inputs are chosen so that every rank's contribution shows in the result: for sums, rank r adds
// 2^r (bits 0..6 record which ranks were counted, and a rank counted twice carries into a higher
// bit) plus an index term that catches blocks put at the wrong offset. Expected values are
// computed here by plain loops, independently of comm/.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallm/comm/group.h"
#include "parallm/core/dtype.h"
#include "parallm/core/error.h"
#include "sanitizer_build.h"

namespace parallm::comm::testing {

// Sanitizer builds (CI) skip the 1M-element cases, which cost minutes there and no extra coverage
// of the synchronisation.
constexpr bool kSanitized = PARALLM_SANITIZED;

struct CheckFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Args>
void require(bool ok, const Args&... args) {
  if (!ok) throw CheckFailure(cat(args...));
}

// Rank r's i-th input, exactly representable in the dtype (the index term is dropped for 16-bit
// types, whose 8 or 11 significant bits could not hold it next to 2^r).
inline float input_value(int r, size_t i, DType dtype, ReduceOp op) {
  if (op == ReduceOp::Max) return float(int((r * 37 + i * 11) % 101) - 50);
  if (dtype == DType::F32) return float(1 << r) + 128.0f * float(i % 4093);
  // 16-bit: 2^r x {1, 1.5, 0.75}: still one bit per rank, and an index pattern.
  static const float kScale[3] = {1.0f, 1.5f, 0.75f};
  return float(1 << r) * kScale[i % 3];
}

inline std::vector<char> make_buffer(size_t count, DType dtype) {
  return std::vector<char>(count * dtype_size(dtype) + 1);
}
inline void store(std::vector<char>& buf, size_t i, float v, DType dtype) {
  convert(&v, DType::F32, buf.data() + i * dtype_size(dtype), dtype, 1);
}
inline float load(const std::vector<char>& buf, size_t i, DType dtype) {
  float v;
  convert(buf.data() + i * dtype_size(dtype), dtype, &v, DType::F32, 1);
  return v;
}
// x rounded to `dtype` and back.
inline float round_to(float x, DType dtype) {
  char tmp[4];
  convert(&x, DType::F32, tmp, dtype, 1);
  convert(tmp, dtype, &x, DType::F32, 1);
  return x;
}
// The reduction over ranks of the (already dtype-rounded) inputs, in f32, rounded once.
inline float reduced(int p, size_t i, DType dtype, ReduceOp op) {
  float acc = 0;
  for (int q = 0; q < p; ++q) {
    const float x = round_to(input_value(q, i, dtype, op), dtype);
    acc = q == 0 ? x : (op == ReduceOp::Sum ? acc + x : std::max(acc, x));
  }
  return round_to(acc, dtype);
}

inline std::string where(const char* call, const Group& g, size_t count, DType dtype,
                         Algorithm algo) {
  return cat(call, " (", algorithm_name(algo), ", ", dtype_name(dtype), ", count ", count,
             ") on rank ", g.rank(), " of ", g.size());
}

inline void check_all_reduce(const Group& g, size_t count, DType dtype, ReduceOp op,
                             Algorithm algo) {
  std::vector<char> buf = make_buffer(count, dtype);
  for (size_t i = 0; i < count; ++i) store(buf, i, input_value(g.rank(), i, dtype, op), dtype);
  g.all_reduce(buf.data(), count, dtype, op, algo);
  // Checking every element of 1M costs more than the call: check a stride, all of small ones.
  const size_t step = count > 100000 ? 97 : 1;
  for (size_t i = 0; i < count; i += step) {
    const float want = reduced(g.size(), i, dtype, op), got = load(buf, i, dtype);
    require(got == want, where("all_reduce", g, count, dtype, algo),
            op == ReduceOp::Sum ? " sum" : " max", ": element ", i, " is ", got, ", expected ",
            want);
  }
  if (count > 0) {
    const float want = reduced(g.size(), count - 1, dtype, op), got = load(buf, count - 1, dtype);
    require(got == want, where("all_reduce", g, count, dtype, algo), ": last element is ", got,
            ", expected ", want);
  }
}

inline float gather_value(int r, size_t i) {
  return float(r * 1000003 % 8191) + float(i % 4099) * 8192.0f;
}

inline void check_all_gather(const Group& g, size_t count, DType dtype, Algorithm algo) {
  const int p = g.size();
  // 16-bit types: keep values exact (small integers).
  auto value = [&](int r, size_t i) {
    return dtype == DType::F32 ? gather_value(r, i) : float((r * 13 + i) % 250);
  };
  std::vector<char> send = make_buffer(count, dtype), recv = make_buffer(count * p, dtype);
  for (size_t i = 0; i < count; ++i) store(send, i, value(g.rank(), i), dtype);
  g.all_gather(send.data(), recv.data(), count, dtype, algo);
  for (int q = 0; q < p; ++q)
    for (size_t i = 0; i < count; i += (count > 100000 ? 89 : 1))
      require(load(recv, q * count + i, dtype) == value(q, i),
              where("all_gather", g, count, dtype, algo), ": block of rank ", q, " element ", i,
              " is ", load(recv, q * count + i, dtype), ", expected ", value(q, i));
}

inline void check_reduce_scatter(const Group& g, size_t count, DType dtype, ReduceOp op,
                                 Algorithm algo) {
  const int p = g.size(), r = g.rank();
  std::vector<char> send = make_buffer(count * p, dtype), recv = make_buffer(count, dtype);
  for (size_t j = 0; j < count * p; ++j) store(send, j, input_value(r, j, dtype, op), dtype);
  g.reduce_scatter(send.data(), recv.data(), count, dtype, op, algo);
  for (size_t i = 0; i < count; i += (count > 100000 ? 97 : 1)) {
    const float want = reduced(p, r * count + i, dtype, op), got = load(recv, i, dtype);
    require(got == want, where("reduce_scatter", g, count, dtype, algo), ": element ", i, " is ",
            got, ", expected ", want);
  }
}

// Rank `src` sends (src + 2 dst + base) % 3 + base elements to `dst`: uneven, some zero.
inline size_t a2a_count(int src, int dst, size_t base) {
  return (src + 2 * dst + base) % 3 + base;
}
inline float a2a_value(int src, int dst, size_t i) {
  return float(src * 100 + dst) + float(i) * 1024.0f;
}

inline void check_all_to_all(const Group& g, size_t base, DType dtype) {
  const int p = g.size(), r = g.rank();
  std::vector<size_t> sc(p), rc(p);
  size_t st = 0, rt = 0;
  for (int q = 0; q < p; ++q) {
    sc[q] = a2a_count(r, q, base);
    rc[q] = a2a_count(q, r, base);
    st += sc[q];
    rt += rc[q];
  }
  // 16-bit types hold only small integers exactly: use one value per (src, dst) pair there.
  auto value = [&](int src, int dst, size_t i) {
    return dtype == DType::F32 ? a2a_value(src, dst, i) : float((src * 7 + dst) % 64);
  };
  std::vector<char> send = make_buffer(st, dtype), recv = make_buffer(rt, dtype);
  for (int q = 0, off = 0; q < p; off += static_cast<int>(sc[q]), ++q)
    for (size_t i = 0; i < sc[q]; ++i) store(send, off + i, value(r, q, i), dtype);
  g.all_to_all(send.data(), sc, recv.data(), rc, dtype);
  for (int q = 0, off = 0; q < p; off += static_cast<int>(rc[q]), ++q)
    for (size_t i = 0; i < rc[q]; ++i)
      require(load(recv, off + i, dtype) == value(q, r, i), "all_to_all (", dtype_name(dtype),
              ", base ", base, ") on rank ", r, " of ", p, ": element ", i, " from rank ", q,
              " is ", load(recv, off + i, dtype), ", expected ", value(q, r, i));
}

inline void check_broadcast(const Group& g, size_t count, int root) {
  std::vector<float> buf(count, -1.0f);
  if (g.rank() == root)
    for (size_t i = 0; i < count; ++i) buf[i] = float(root * 7 + i % 1009);
  g.broadcast(buf.data(), count, DType::F32, root);
  for (size_t i = 0; i < count; ++i)
    require(buf[i] == float(root * 7 + i % 1009), "broadcast from root ", root, " count ", count,
            " on rank ", g.rank(), ": element ", i, " is ", buf[i]);
}

// Every rank sends to both neighbours before receiving: must not deadlock, must match by tag.
inline void check_ring_send_recv(const Group& g, size_t count) {
  const int p = g.size(), r = g.rank(), next = (r + 1) % p, prev = (r - 1 + p) % p;
  std::vector<float> to_next(count), to_prev(count), from_prev(count, -1), from_next(count, -1);
  for (size_t i = 0; i < count; ++i) {
    to_next[i] = float(r * 10 + 1) + float(i % 1000) * 64;
    to_prev[i] = float(r * 10 + 2) + float(i % 1000) * 64;
  }
  const size_t bytes = count * sizeof(float);
  g.send(to_next.data(), bytes, next, /*tag=*/1);
  g.send(to_prev.data(), bytes, prev, /*tag=*/2);
  // Receive in the opposite order from the sends, so matching is by tag, not arrival.
  g.recv(from_next.data(), bytes, next, 2);
  g.recv(from_prev.data(), bytes, prev, 1);
  for (size_t i = 0; i < count; ++i) {
    require(from_prev[i] == float(prev * 10 + 1) + float(i % 1000) * 64,
            "ring recv from prev on rank ", r, ": element ", i, " is ", from_prev[i]);
    require(from_next[i] == float(next * 10 + 2) + float(i % 1000) * 64,
            "ring recv from next on rank ", r, ": element ", i, " is ", from_next[i]);
  }
}

// ---- integer data: copied bit-exactly, never through f32 -----------------------------------------

// Rank r's i-th value of an integer dtype: above 2^24 (i32) or 2^53 (i64), where a trip through
// f32 or f64 would round, and with low bits that record rank and index; negative for odd i.
template <class T>
T int_value(int r, size_t i) {
  if constexpr (sizeof(T) == 1) {
    return static_cast<T>((r * 53 + i * 7 + 1) % 256);
  } else {
    const T big = sizeof(T) == 8 ? (T(1) << 53) + (T(1) << 60) : (T(1) << 24) + (T(1) << 29);
    const T v = big + T(r) * 1000003 + T(i) * 2 + 1;
    return i % 2 ? -v : v;
  }
}

template <class T>
constexpr DType dtype_of() {
  if constexpr (sizeof(T) == 1) return DType::U8;
  if constexpr (sizeof(T) == 4) return DType::I32;
  return DType::I64;
}

template <class T>
void check_int_all_gather(const Group& g, size_t count, Algorithm algo) {
  const int p = g.size();
  const DType dtype = dtype_of<T>();
  std::vector<T> send(count), recv(count * p + 1, T(0));
  for (size_t i = 0; i < count; ++i) send[i] = int_value<T>(g.rank(), i);
  g.all_gather(send.data(), recv.data(), count, dtype, algo);
  for (int q = 0; q < p; ++q)
    for (size_t i = 0; i < count; ++i)
      require(recv[q * count + i] == int_value<T>(q, i), where("all_gather", g, count, dtype, algo),
              ": block of rank ", q, " element ", i, " is ", int64_t(recv[q * count + i]),
              ", expected ", int64_t(int_value<T>(q, i)));
  require(recv[count * p] == T(0), where("all_gather", g, count, dtype, algo),
          ": wrote past the end");
}

template <class T>
void check_int_broadcast(const Group& g, size_t count, int root) {
  const DType dtype = dtype_of<T>();
  std::vector<T> buf(count + 1, T(0));
  if (g.rank() == root)
    for (size_t i = 0; i < count; ++i) buf[i] = int_value<T>(root, i);
  g.broadcast(buf.data(), count, dtype, root);
  for (size_t i = 0; i < count; ++i)
    require(buf[i] == int_value<T>(root, i), "broadcast (", dtype_name(dtype), ") from root ", root,
            " count ", count, " on rank ", g.rank(), ": element ", i, " is ", int64_t(buf[i]),
            ", expected ", int64_t(int_value<T>(root, i)));
  require(buf[count] == T(0), "broadcast (", dtype_name(dtype), "): wrote past the end");
}

template <class T>
void check_int_all_to_all(const Group& g, size_t base) {
  const int p = g.size(), r = g.rank();
  const DType dtype = dtype_of<T>();
  std::vector<size_t> sc(p), rc(p);
  size_t st = 0, rt = 0;
  for (int q = 0; q < p; ++q) {
    sc[q] = a2a_count(r, q, base);
    rc[q] = a2a_count(q, r, base);
    st += sc[q];
    rt += rc[q];
  }
  // Element i from src to dst: int_value of "rank" src * 8 + dst, so pairs are told apart.
  std::vector<T> send(st), recv(rt + 1, T(0));
  for (int q = 0, off = 0; q < p; off += static_cast<int>(sc[q]), ++q)
    for (size_t i = 0; i < sc[q]; ++i) send[off + i] = int_value<T>(r * 8 + q, i);
  g.all_to_all(send.data(), sc, recv.data(), rc, dtype);
  for (int q = 0, off = 0; q < p; off += static_cast<int>(rc[q]), ++q)
    for (size_t i = 0; i < rc[q]; ++i)
      require(recv[off + i] == int_value<T>(q * 8 + r, i), "all_to_all (", dtype_name(dtype),
              ", base ", base, ") on rank ", r, " of ", p, ": element ", i, " from rank ", q,
              " is ", int64_t(recv[off + i]), ", expected ", int64_t(int_value<T>(q * 8 + r, i)));
  require(recv[rt] == T(0), "all_to_all (", dtype_name(dtype), "): wrote past the end");
}

// Integers sent around the ring as bytes.
inline void check_int_send_recv(const Group& g, size_t count) {
  const int p = g.size(), r = g.rank(), next = (r + 1) % p, prev = (r - 1 + p) % p;
  std::vector<int64_t> out(count), in(count, 0);
  for (size_t i = 0; i < count; ++i) out[i] = int_value<int64_t>(r, i);
  g.send(out.data(), count * sizeof(int64_t), next, 3);
  g.recv(in.data(), count * sizeof(int64_t), prev, 3);
  for (size_t i = 0; i < count; ++i)
    require(in[i] == int_value<int64_t>(prev, i), "send/recv (i64) on rank ", r, ": element ", i,
            " is ", in[i], ", expected ", int_value<int64_t>(prev, i));
}

// all_reduce and reduce_scatter refuse integer dtypes, at every size (size 1 included), with
// std::invalid_argument naming the call and the dtype.
inline void check_int_reductions_refused(const Group& g) {
  int64_t x[8] = {};
  int64_t y[8] = {};
  for (DType dtype : {DType::I32, DType::I64, DType::U8}) {
    auto refused = [&](const char* call, auto&& fn) {
      try {
        fn();
      } catch (const std::invalid_argument& e) {
        const std::string m = e.what();
        require(m.find(call) != std::string::npos &&
                    m.find(cat("dtype ", dtype_name(dtype))) != std::string::npos,
                call, " of ", dtype_name(dtype), ": message does not name both: ", m);
        return;
      }
      require(false, call, " of ", dtype_name(dtype), " on rank ", g.rank(), " of ", g.size(),
              " did not throw");
    };
    refused("all_reduce", [&] { g.all_reduce(x, 1, dtype, ReduceOp::Max); });
    refused("reduce_scatter", [&] { g.reduce_scatter(x, y, 1, dtype, ReduceOp::Sum); });
  }
}

// Every copying collective on every integer dtype and algorithm, at a few counts.
inline void run_int_suite(const Group& g) {
  for (size_t count : {size_t(1), size_t(7), size_t(1000)}) {
    for (Algorithm a : {Algorithm::Native, Algorithm::Ring, Algorithm::RecursiveDoubling}) {
      check_int_all_gather<int32_t>(g, count, a);
      check_int_all_gather<int64_t>(g, count, a);
      check_int_all_gather<uint8_t>(g, count, a);
    }
    for (int root = 0; root < g.size(); ++root) {
      check_int_broadcast<int32_t>(g, count, root);
      check_int_broadcast<int64_t>(g, count, root);
      check_int_broadcast<uint8_t>(g, count, root);
    }
    if (g.size() > 1) check_int_send_recv(g, count);
  }
  for (size_t base : {size_t(0), size_t(1), size_t(100)}) {
    check_int_all_to_all<int32_t>(g, base);
    check_int_all_to_all<int64_t>(g, base);
    check_int_all_to_all<uint8_t>(g, base);
  }
  // all_to_all and broadcast over send/recv (pairwise, binomial tree).
  const CommOptions saved = g.options();
  CommOptions forced = saved;
  forced.algorithm = Algorithm::Ring;
  g.set_options(forced);
  for (size_t base : {size_t(1), size_t(100)}) {
    check_int_all_to_all<int64_t>(g, base);
    check_int_all_to_all<uint8_t>(g, base);
  }
  for (int root = 0; root < g.size(); ++root) {
    check_int_broadcast<int64_t>(g, 1000, root);
    check_int_broadcast<int32_t>(g, 7, root);
  }
  g.set_options(saved);
  check_int_reductions_refused(g);
}

inline const std::vector<size_t>& conformance_counts() {
  static const std::vector<size_t> counts = {0, 1, 7, 1000, 1u << 20};
  return counts;
}

// The whole suite on one group. `big` includes the 1M-element cases.
inline void run_suite(const Group& g, bool big = !kSanitized) {
  const Algorithm algos[] = {Algorithm::Native, Algorithm::Ring, Algorithm::RecursiveDoubling};
  for (size_t count : conformance_counts()) {
    if (count > 1000 && !big) continue;
    for (Algorithm a : algos) {
      check_all_reduce(g, count, DType::F32, ReduceOp::Sum, a);
      if (count <= 1000) {
        check_all_reduce(g, count, DType::F32, ReduceOp::Max, a);
        check_all_reduce(g, count, DType::BF16, ReduceOp::Sum, a);
        check_all_reduce(g, count, DType::BF16, ReduceOp::Max, a);
        check_all_reduce(g, count, DType::F16, ReduceOp::Sum, a);
      }
      // all_gather / reduce_scatter: `count` is the total, split over the ranks.
      const size_t per = count / g.size() + (count > 0 && count < size_t(g.size()) ? 1 : 0);
      check_all_gather(g, per, DType::F32, a);
      check_reduce_scatter(g, per, DType::F32, ReduceOp::Sum, a);
      if (count <= 1000) {
        check_all_gather(g, per, DType::BF16, a);
        check_reduce_scatter(g, per, DType::BF16, ReduceOp::Sum, a);
        check_reduce_scatter(g, per, DType::F32, ReduceOp::Max, a);
      }
    }
    if (count <= 1000) {
      check_all_to_all(g, count / 10, DType::F32);
      check_all_to_all(g, count / 10, DType::BF16);
      check_broadcast(g, count, 0);
      check_broadcast(g, count, g.size() - 1);
      if (g.size() > 1) check_ring_send_recv(g, count);
    }
  }
  if (g.size() > 1 && big) check_ring_send_recv(g, 1u << 20);
  // all_to_all and broadcast over send/recv (pairwise, binomial tree) when the group says so.
  const CommOptions saved = g.options();
  CommOptions forced = saved;
  forced.algorithm = Algorithm::Ring;
  g.set_options(forced);
  for (size_t base : {size_t(0), size_t(1), size_t(100)}) check_all_to_all(g, base, DType::F32);
  for (int root = 0; root < g.size(); ++root) check_broadcast(g, 1000, root);
  g.set_options(saved);
  run_int_suite(g);
}

// split: even and odd ranks, ordered by descending key; a collective in each sub-group; a split
// of a split; everyone in their own group (size 1).
inline void check_split(const Group& world) {
  const int p = world.size(), r = world.rank();
  Group half = world.split(r % 2, -r, "half");
  std::vector<int> members;  // world ranks with my parity, by descending world rank
  for (int q = p - 1; q >= 0; --q)
    if (q % 2 == r % 2) members.push_back(q);
  require(half.size() == int(members.size()), "split: rank ", r, " got size ", half.size(),
          ", expected ", members.size());
  int want_rank = 0;
  while (members[want_rank] != r) ++want_rank;
  require(half.rank() == want_rank, "split: rank ", r, " got sub-rank ", half.rank(), ", expected ",
          want_rank);
  require(half.name() == "half", "split: name is \"", half.name(), "\"");
  // Gather the world ranks of the members, in sub-group order.
  std::vector<float> got(half.size());
  const float mine = float(r);
  half.all_gather(&mine, got.data(), 1, DType::F32);
  for (int i = 0; i < half.size(); ++i)
    require(got[i] == float(members[i]), "split: sub-rank ", i, " is world rank ", got[i],
            ", expected ", members[i]);
  run_suite(half, /*big=*/false);
  // Nested: split the half again by sub-rank / 2.
  Group quarter = half.split(half.rank() / 2, half.rank());
  float sum = float(r);
  quarter.all_reduce(&sum, 1);
  float want = 0;
  for (int i = (half.rank() / 2) * 2; i < std::min(half.size(), (half.rank() / 2) * 2 + 2); ++i)
    want += float(members[i]);
  require(sum == want, "nested split: sum of world ranks is ", sum, ", expected ", want);
  // Messages in a sub-group never match the parent's, even with the same tag.
  if (p >= 2) {
    Group self = world.split(r, 0);
    require(self.size() == 1 && self.rank() == 0, "split by rank: size ", self.size());
    float x = 5;
    self.all_reduce(&x, 1);
    require(x == 5, "size-1 all_reduce changed the data");
  }
}

}  // namespace parallm::comm::testing
