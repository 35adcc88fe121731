// Listening-socket options for every HTTP front (serve, playground).
#pragma once

#include <httplib.h>
#include <sys/socket.h>

namespace parallm::server {

// cpp-httplib's default socket options set SO_REUSEPORT as well as SO_REUSEADDR: a second server
// started on a port in use would then bind beside the first and share its connections, silently.
// SO_REUSEADDR alone still lets a restarted server take its port back at once (TIME_WAIT).
inline void use_exclusive_port(httplib::Server& svr) {
  svr.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
}

}  // namespace parallm::server
