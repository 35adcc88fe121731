// parallm playground: one web page over the planner, the schedule simulator and real traces, and
// the JSON API it calls (playground/api.h; docs/playground.md). On cpp-httplib, as `serve` is; the
// page is compiled into the binary (playground/web_assets.h), nothing is fetched at run time.
#include <httplib.h>
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "parallm/cli/command.h"
#include "parallm/core/error.h"
#include "parallm/core/json_limits.h"
#include "parallm/playground/api.h"
#include "parallm/playground/web_assets.h"
#include "parallm/server/socket_options.h"

namespace parallm::cli {
namespace {

using nlohmann::json;

struct PlaygroundOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
};

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
}

// A POST route: the body parsed (400 naming what is wrong), the handler's answer as JSON; a
// caller's mistake (std::invalid_argument) is a 400 with {"error": "<one line>"}.
httplib::Server::Handler api_route(json (*fn)(const json&)) {
  return [fn](const httplib::Request& req, httplib::Response& res) {
    try {
      const json body = parse_json_text(req.body, "playground", "request body");
      send_json(res, 200, fn(body));
    } catch (const std::invalid_argument& e) {
      send_json(res, 400, {{"error", e.what()}});
    } catch (const json::type_error& e) {  // a field of the wrong type that no check named
      send_json(res, 400, {{"error", cat("[playground] ", req.path, ": ", e.what())}});
    } catch (const std::exception& e) {
      send_json(res, 500, {{"error", e.what()}});
    }
  };
}

int run(const PlaygroundOptions& o) {
  if (o.port < 0 || o.port > 65535) fail("playground", "--port ", o.port, " is not in [0, 65535]");
  // SIGINT/SIGTERM are taken by sigwait below, not by whichever thread they land on: block them
  // before the server's threads start (they inherit the mask).
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::signal(SIGPIPE, SIG_IGN);  // a browser that goes away mid-answer

  httplib::Server svr;
  svr.set_payload_max_length(playground::kMaxBodyBytes);
  server::use_exclusive_port(svr);  // a port in use is refused, not shared
  for (const playground::WebAsset& a : playground::web_assets()) {
    const std::string body(a.body), mime(a.mime);
    auto serve = [body, mime](const httplib::Request&, httplib::Response& res) {
      res.set_header("Cache-Control", "no-store");
      res.set_content(body, mime);
    };
    svr.Get(std::string(a.path), serve);
    if (a.path == "/index.html") svr.Get("/", serve);
  }
  svr.Get("/api/presets", [](const httplib::Request&, httplib::Response& res) {
    send_json(res, 200, playground::api_presets());
  });
  svr.Post("/api/plan", api_route(playground::api_plan));
  svr.Post("/api/schedule", api_route(playground::api_schedule));
  svr.Post("/api/trace", api_route(playground::api_trace));
  svr.Post("/api/layer-split", api_route(playground::api_layer_split));
  // Statuses httplib sets itself (no such route, a body over the limit) get a JSON line too.
  svr.set_error_handler([](const httplib::Request& q, httplib::Response& r) {
    if (!r.body.empty()) return;
    send_json(r, r.status,
              {{"error", r.status == 404 ? cat("no route ", q.method, " ", q.path)
                         : r.status == 413
                             ? cat("request body over the limit (", playground::kMaxBodyBytes >> 20,
                                   " MiB; a form-encoded one 8 KiB: send "
                                   "Content-Type: application/json)")
                             : cat("HTTP error ", r.status)}});
  });

  int port = o.port;
  if (port == 0)
    port = svr.bind_to_any_port(o.host);
  else if (!svr.bind_to_port(o.host, port))
    port = -1;
  if (port <= 0)
    fail<std::runtime_error>("playground", "cannot listen on ", o.host, ":", o.port,
                             " (address in use, or not an address of this host)");
  std::thread listener([&svr] { svr.listen_after_bind(); });
  std::printf("playground: http://%s:%d/\n", o.host.c_str(), port);
  std::fflush(stdout);
  int sig = 0;
  sigwait(&sigs, &sig);
  std::printf("playground: signal %d, shutting down\n", sig);
  svr.stop();
  listener.join();
  return 0;
}

const bool registered = register_command(
    {"playground",
     "Serve an interactive page over the planner, the pipeline schedules and real traces",
     [](CLI::App& app) {
       auto o = std::make_shared<PlaygroundOptions>();
       app.add_option("--host", o->host, "Address to listen on (default 127.0.0.1)");
       app.add_option("--port", o->port, "Port (default 8080; 0: any free port, printed)");
       return [o] { return run(*o); };
     }});

}  // namespace
}  // namespace parallm::cli
