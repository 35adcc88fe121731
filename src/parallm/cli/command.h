// The CLI's command registry. Each subcommand lives in its own file under src/parallm/cli/ and
// registers itself at static-initialisation time:
//
//   static const bool registered = parallm::cli::register_command(
//       {"bench decode", "Decode tokens/s against the memory roofline", [](CLI::App& app) {
//          auto opts = std::make_shared<Options>();
//          app.add_option("--model", opts->model, "...")->required();
//          return [opts] { return run(*opts); };   // returns the process exit code
//        }});
//
// A path with a space ("bench decode") makes a nested subcommand. The CLI files are compiled into
// the binary itself (not the library), so nothing drops the registrations.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

namespace parallm::cli {

using RunFn = std::function<int()>;

struct Command {
  std::string path;  // "generate", "bench decode"
  std::string description;
  std::function<RunFn(CLI::App&)> setup;  // adds options, returns what to run
};

bool register_command(Command command);

}  // namespace parallm::cli
