// parallm: the command-line entry point. Subcommands register themselves (see command.h); this
// file builds the CLI11 tree, runs the chosen one, and turns exceptions into one line on stderr and
// a non-zero exit.
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <vector>

#include "parallm/cli/command.h"

namespace parallm::cli {
namespace {

std::vector<Command>& registry() {
  static std::vector<Command> commands;
  return commands;
}

}  // namespace

bool register_command(Command command) {
  registry().push_back(std::move(command));
  return true;
}

}  // namespace parallm::cli

int main(int argc, char** argv) {
  using namespace parallm::cli;
  CLI::App app{
      "parallm: run LLaMA-family models split across ranks (tensor, pipeline, data "
      "parallel), and plan how to split them"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for every subcommand");

  std::map<std::string, CLI::App*> groups;  // "bench" -> its App
  RunFn chosen;
  // Keep actions alive until the one chosen runs.
  std::vector<std::unique_ptr<RunFn>> actions;
  for (const Command& c : registry()) {
    CLI::App* parent = &app;
    std::string name = c.path;
    if (auto sp = c.path.find(' '); sp != std::string::npos) {
      const std::string group = c.path.substr(0, sp);
      name = c.path.substr(sp + 1);
      auto& g = groups[group];
      if (!g) {
        g = app.add_subcommand(group, group == "bench" ? "Benchmarks that print their numbers"
                                      : group == "checkpoint" ? "Inspect training checkpoints"
                                                              : group);
        g->require_subcommand(1);
      }
      parent = g;
    }
    CLI::App* sub = parent->add_subcommand(name, c.description);
    actions.push_back(std::make_unique<RunFn>(c.setup(*sub)));
    RunFn* act = actions.back().get();
    sub->callback([&chosen, act] { chosen = *act; });
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // One line: CLI11's message names the flag or value at fault.
    std::fprintf(stderr, "parallm: error: %s (see --help)\n", e.what());
    return e.get_exit_code() == 0 ? 2 : e.get_exit_code();
  }
  try {
    return chosen ? chosen() : 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "parallm: error: %s\n", e.what());
    return 1;
  }
}
