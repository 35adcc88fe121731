// Whether the client of a request still holds its connection. cpp-httplib 0.11.4 hands handlers a
// Request without its socket (newer versions have Request::is_connection_closed; here
// Server::process_and_close_socket, where the socket is known, is a private virtual: an override
// could not call the original). But the Request carries both ends' addresses, and a TCP
// connection is the one socket of this process with that local and that remote address: the
// handler finds its fd among /proc/self/fd once, then polls it without reading (POLLRDHUP: the
// client closed or shut down its side). The fd stays this connection's until the handler and
// its content provider return (httplib closes it after), so polling it meanwhile is safe.
#pragma once

#include <string>

namespace parallm::server {

class ConnectionProbe {
 public:
  ConnectionProbe() = default;
  // Looks for the socket local_addr:local_port <-> remote_addr:remote_port (numeric hosts, as
  // httplib writes them); not found (another OS, an address httplib wrote otherwise): fd() -1,
  // and closed() is always false.
  ConnectionProbe(const std::string& local_addr, int local_port, const std::string& remote_addr,
                  int remote_port);
  int fd() const { return fd_; }
  // True once the peer has closed (or reset) the connection; never blocks, reads nothing.
  bool closed() const;

 private:
  int fd_ = -1;
};

}  // namespace parallm::server
