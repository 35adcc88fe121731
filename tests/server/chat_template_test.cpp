// Chat templates against jinja2: tests/reference/chat_template_golden.json holds what Python's
// jinja2 renders from the Hugging Face template strings in chat_template_fixtures.json
// (tests/reference/chat_template_ref.py); the C++ families must give the same bytes, and refuse
// the conversations the templates raise on.
#include "parallm/server/chat_template.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "server/server_test_util.h"

namespace parallm::server {
namespace {

using nlohmann::json;

json read_json(const std::string& rel) {
  std::ifstream in(std::string(PARALLM_SOURCE_DIR) + "/" + rel);
  EXPECT_TRUE(in.good()) << rel;
  return json::parse(in);
}

std::vector<ChatMessage> messages_of(const json& conv) {
  std::vector<ChatMessage> out;
  for (const json& m : conv["messages"]) out.push_back({m["role"], m["content"]});
  return out;
}

TEST(ChatTemplate, MatchesJinjaGoldens) {
  const json fixtures = read_json("tests/reference/chat_template_fixtures.json");
  const json golden = read_json("tests/reference/chat_template_golden.json");
  int checked = 0, refused = 0;
  for (const json& c : golden["cases"]) {
    const std::string name = c["template"];
    const json& t = fixtures["templates"][name];
    const std::string source = t["chat_template"];
    const auto family = detect_chat_family(source);
    ASSERT_TRUE(family) << name;
    EXPECT_EQ(chat_family_name(*family), t["family"].get<std::string>()) << name;
    const ChatTemplate tpl(
        *family, t["bos_token"].is_string() ? t["bos_token"].get<std::string>() : "",
        t["eos_token"].is_string() ? t["eos_token"].get<std::string>() : "", source);
    const auto msgs = messages_of(fixtures["conversations"][c["conversation"].get<size_t>()]);
    const bool gen = c["add_generation_prompt"];
    if (c.contains("error")) {
      EXPECT_THROW(tpl.render(msgs, gen), std::invalid_argument) << name << " " << c.dump();
      ++refused;
    } else {
      std::string got;
      EXPECT_NO_THROW(got = tpl.render(msgs, gen)) << name << " " << c.dump();
      EXPECT_EQ(got, c["text"].get<std::string>()) << name << " " << c.dump();
      ++checked;
    }
  }
  EXPECT_GT(checked, 60);
  EXPECT_GT(refused, 10);
}

TEST(ChatTemplate, LoadFromModelDirOverrideAndNone) {
  testing::TempModelDir dir(testing::kChatmlTemplate);
  auto tok = load_tokenizer(dir.str());
  std::string why;
  auto t = load_chat_template(dir.str(), "", tok.get(), &why);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->family(), ChatFamily::ChatML);
  EXPECT_EQ(t->bos_token(), "<s>");
  EXPECT_EQ(t->eos_token(), "</s>");
  auto o = load_chat_template(dir.str(), "mistral", tok.get(), &why);
  ASSERT_TRUE(o);
  EXPECT_EQ(o->family(), ChatFamily::Mistral);
  EXPECT_EQ(o->render({{"user", "hi"}}, true), "<s>[INST] hi [/INST]");
  EXPECT_THROW(load_chat_template(dir.str(), "alpaca", tok.get(), &why), std::invalid_argument);

  testing::TempModelDir plain("{{ messages[0]['content'] }}");  // no known family
  EXPECT_FALSE(load_chat_template(plain.str(), "", tok.get(), &why));
  EXPECT_NE(why.find("not one of the supported"), std::string::npos) << why;
  testing::TempModelDir none("");
  EXPECT_FALSE(load_chat_template(none.str(), "", tok.get(), &why));
  EXPECT_NE(why.find("--chat-template"), std::string::npos) << why;
  // Without tokenizer_config.json, BOS/EOS text comes from the tokenizer.
  auto l3 = load_chat_template(none.str(), "llama-3", tok.get(), &why);
  ASSERT_TRUE(l3);
  EXPECT_EQ(l3->bos_token(), "<s>");
}

}  // namespace
}  // namespace parallm::server
