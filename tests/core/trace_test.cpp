#include "parallm/core/trace.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace parallm {
namespace {

// A span name that string concatenation would turn into invalid JSON.
const std::string kNasty = std::string("say \"hi\" \\ back\\slash\ttab\nnewline\x01\x1f end");

TEST(Trace, NamesWithQuotesBackslashesAndControlCharsStayValidJson) {
  TraceBuffer buf(3);
  buf.add(kNasty, "compute", 1.0, 1.5);
  buf.add("plain", "comm", 2.0, 2.25);
  const nlohmann::json events = nlohmann::json::parse("[" + buf.to_json_events() + "]");
  ASSERT_EQ(events.size(), 3u);  // the process name, then the two spans
  EXPECT_EQ(events[0]["ph"], "M");
  EXPECT_EQ(events[0]["args"]["name"], "rank 3");
  EXPECT_EQ(events[1]["name"], kNasty);  // round-trips exactly
  EXPECT_EQ(events[1]["cat"], "compute");
  EXPECT_EQ(events[1]["pid"], 3);
  EXPECT_DOUBLE_EQ(events[1]["ts"].get<double>(), 1e6);
  EXPECT_DOUBLE_EQ(events[1]["dur"].get<double>(), 0.5e6);
  EXPECT_EQ(events[2]["name"], "plain");
}

TEST(Trace, BytesThatAreNotUtf8DoNotThrow) {
  TraceBuffer buf(0);
  buf.add(std::string("bad \xff\xfe byte"), "wait", 0, 1);
  const nlohmann::json events = nlohmann::json::parse("[" + buf.to_json_events() + "]");
  EXPECT_EQ(events[1]["name"], "bad \xEF\xBF\xBD\xEF\xBF\xBD byte");  // U+FFFD each
}

TEST(Trace, FileOfSeveralRanksParses) {
  TraceBuffer a(0), b(1);
  a.add(kNasty, "compute", 0, 1);
  b.add("recv \"x\"", "p2p", 0, 2);
  const std::string path = ::testing::TempDir() + "trace_test_" + std::to_string(::getpid()) + ".json";
  write_trace_file(path, {a.to_json_events(), "", b.to_json_events()});  // an empty rank skipped
  std::ifstream in(path);
  const nlohmann::json trace = nlohmann::json::parse(in);
  std::remove(path.c_str());
  ASSERT_EQ(trace["traceEvents"].size(), 4u);
  EXPECT_EQ(trace["traceEvents"][1]["name"], kNasty);
  EXPECT_EQ(trace["traceEvents"][3]["name"], "recv \"x\"");
  EXPECT_EQ(trace["traceEvents"][3]["pid"], 1);
}

TEST(Trace, SpansRecordOnlyWhileTracing) {
  TraceBuffer buf(0);
  { TraceSpan s("before", "compute"); }
  set_thread_trace(&buf);
  { TraceSpan s(kNasty, "compute"); }
  set_thread_trace(nullptr);
  { TraceSpan s("after", "compute"); }
  ASSERT_EQ(buf.events().size(), 1u);
  EXPECT_EQ(buf.events()[0].name, kNasty);
}

}  // namespace
}  // namespace parallm
