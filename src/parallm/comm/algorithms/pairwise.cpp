// All-to-all by pairwise exchange and broadcast by binomial tree, over send/recv.
#include <cstring>
#include <vector>

#include "parallm/comm/algorithms/algorithms.h"

namespace parallm::comm::algorithms {

void pairwise_all_to_all(GroupImpl& g, const void* send, const size_t* send_counts, void* recv,
                         const size_t* recv_counts, DType dtype) {
  const int p = g.size(), r = g.rank();
  const size_t elem = dtype_size(dtype);
  std::vector<size_t> send_off(p + 1, 0), recv_off(p + 1, 0);
  for (int i = 0; i < p; ++i) {
    send_off[i + 1] = send_off[i] + send_counts[i];
    recv_off[i + 1] = recv_off[i] + recv_counts[i];
  }
  const char* s = static_cast<const char*>(send);
  char* d = static_cast<char*>(recv);
  if (send_counts[r] > 0)
    std::memcpy(d + recv_off[r] * elem, s + send_off[r] * elem, send_counts[r] * elem);
  // Step k: send to r + k while receiving from r - k, so every pair meets exactly once.
  for (int k = 1; k < p; ++k) {
    const int dst = (r + k) % p, src = (r - k + p) % p;
    g.coll_sendrecv(s + send_off[dst] * elem, send_counts[dst] * elem, dst,
                    d + recv_off[src] * elem, recv_counts[src] * elem, src);
  }
}

void binomial_broadcast(GroupImpl& g, void* data, size_t count, DType dtype, int root) {
  const int p = g.size();
  const int vrank = (g.rank() - root + p) % p;  // the root is virtual rank 0
  const size_t bytes = count * dtype_size(dtype);
  int mask = 1;
  while (mask < p) {
    if (vrank & mask) {
      g.coll_recv(data, bytes, (vrank - mask + root) % p);
      break;
    }
    mask <<= 1;
  }
  for (mask >>= 1; mask > 0; mask >>= 1) {
    if (vrank + mask < p) g.coll_send(data, bytes, (vrank + mask + root) % p);
  }
}

}  // namespace parallm::comm::algorithms
