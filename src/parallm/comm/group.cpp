// TEMPORARY size-1 only implementation; the comm layer (issue 3) replaces this file.
#include "parallm/comm/group.h"

#include <cstring>

#include "parallm/core/error.h"

namespace parallm::comm {

class CommStats {};

Group::Group() = default;
Group::Group(std::shared_ptr<GroupImpl> impl) : impl_(std::move(impl)) {}
int Group::rank() const { return 0; }
int Group::size() const { return 1; }
const std::string& Group::name() const {
  static const std::string n = "self";
  return n;
}
void Group::all_reduce(void*, size_t, DType, ReduceOp, Algorithm) const {}
void Group::all_gather(const void* s, void* r, size_t c, DType d, Algorithm) const {
  if (s != r) std::memcpy(r, s, c * dtype_size(d));
}
void Group::reduce_scatter(const void* s, void* r, size_t c, DType d, ReduceOp, Algorithm) const {
  if (s != r) std::memcpy(r, s, c * dtype_size(d));
}
void Group::all_to_all(const void* s, const std::vector<size_t>& sc, void* r,
                       const std::vector<size_t>&, DType d) const {
  if (s != r) std::memcpy(r, s, sc.at(0) * dtype_size(d));
}
void Group::broadcast(void*, size_t, DType, int) const {}
void Group::send(const void*, size_t, int, int) const { fail("comm", "send on a size-1 group"); }
void Group::recv(void*, size_t, int, int) const { fail("comm", "recv on a size-1 group"); }
void Group::barrier() const {}
Group Group::split(int, int) const { return Group(); }
CommStats& Group::stats() const {
  static CommStats s;
  return s;
}

}  // namespace parallm::comm
