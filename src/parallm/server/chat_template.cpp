#include "parallm/server/chat_template.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "parallm/core/error.h"
#include "parallm/model/tokenizer.h"

namespace parallm::server {
namespace {

using nlohmann::json;

// Python's str.strip() (Jinja's trim filter and the templates' .strip()) for the whitespace
// that occurs in chat text: ASCII whitespace and the separators Python also counts.
std::string py_strip(const std::string& s) {
  auto ws = [](unsigned char c) {
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
  };
  size_t b = 0, e = s.size();
  while (b < e && ws(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && ws(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

[[noreturn]] void refuse(const std::string& why) {
  throw std::invalid_argument(why);
}

// The text of a special token entry of tokenizer_config.json: a string or {"content": ...}.
std::string token_text(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string())
    return j["content"].get<std::string>();
  return "";
}

// Qwen's chatml adds "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" when the
// conversation has no system turn; the text is read from the template (the "\n" in it is
// either a newline or a Jinja escape, as the JSON spelled it).
std::string chatml_default_system(const std::string& src) {
  if (src.find("loop.first") == std::string::npos || src.find("!= 'system'") == std::string::npos)
    return "";
  const std::string open = "<|im_start|>system";
  size_t p = src.find(open);
  if (p == std::string::npos) return "";
  p += open.size();
  if (src.compare(p, 2, "\\n") == 0) {
    p += 2;
  } else if (p < src.size() && src[p] == '\n') {
    p += 1;
  } else {
    return "";
  }
  const size_t end = src.find("<|im_end|>", p);
  if (end == std::string::npos) return "";
  return src.substr(p, end - p);
}

}  // namespace

const char* chat_family_name(ChatFamily f) {
  switch (f) {
    case ChatFamily::Llama2:
      return "llama-2";
    case ChatFamily::Llama3:
      return "llama-3";
    case ChatFamily::ChatML:
      return "chatml";
    case ChatFamily::Mistral:
      return "mistral";
  }
  return "?";
}

std::optional<ChatFamily> chat_family_from_name(const std::string& name) {
  for (ChatFamily f :
       {ChatFamily::Llama2, ChatFamily::Llama3, ChatFamily::ChatML, ChatFamily::Mistral}) {
    if (name == chat_family_name(f)) return f;
  }
  return std::nullopt;
}

std::optional<ChatFamily> detect_chat_family(const std::string& jinja) {
  auto has = [&](const char* s) { return jinja.find(s) != std::string::npos; };
  if (has("<|start_header_id|>")) return ChatFamily::Llama3;
  if (has("<|im_start|>")) return ChatFamily::ChatML;
  if (has("<<SYS>>")) return ChatFamily::Llama2;
  if (has("[INST]")) return ChatFamily::Mistral;
  return std::nullopt;
}

ChatTemplate::ChatTemplate(ChatFamily family, std::string bos_token, std::string eos_token,
                           const std::string& source)
    : family_(family), bos_(std::move(bos_token)), eos_(std::move(eos_token)) {
  if (family_ == ChatFamily::ChatML) default_system_ = chatml_default_system(source);
  if (family_ == ChatFamily::Mistral)
    eos_then_space_ = source.find("eos_token + ' '") != std::string::npos;
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt) const {
  if (messages.empty()) refuse("messages: at least one message is needed");
  std::string out;
  const char* alternate =
      "messages: conversation roles must alternate user/assistant/user/assistant/... (after an "
      "optional system message)";
  switch (family_) {
    case ChatFamily::Llama2: {
      // A leading system message goes inside the first user turn; the template emits nothing
      // for a role other than user and assistant at an odd position and refuses it at an even
      // one (the alternation check), and ignores add_generation_prompt.
      size_t first = 0;
      const std::string* system = nullptr;
      if (messages[0].role == "system") {
        system = &messages[0].content;
        first = 1;
      }
      for (size_t i = first; i < messages.size(); ++i) {
        const size_t idx = i - first;
        const ChatMessage& m = messages[i];
        if ((m.role == "user") != (idx % 2 == 0)) refuse(alternate);
        std::string content = m.content;
        if (idx == 0 && system) content = "<<SYS>>\n" + *system + "\n<</SYS>>\n\n" + m.content;
        if (m.role == "user") {
          out += bos_ + "[INST] " + py_strip(content) + " [/INST]";
        } else if (m.role == "assistant") {
          out += " " + py_strip(content) + " " + eos_;
        }
      }
      break;
    }
    case ChatFamily::Llama3: {
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0) out += bos_;
        out += "<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n" +
               py_strip(messages[i].content) + "<|eot_id|>";
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    }
    case ChatFamily::ChatML: {
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0 && !default_system_.empty() && messages[0].role != "system")
          out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
        out += "<|im_start|>" + messages[i].role + "\n" + messages[i].content + "<|im_end|>\n";
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;
    }
    case ChatFamily::Mistral: {
      out += bos_;
      for (size_t i = 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if ((m.role == "user") != (i % 2 == 0)) refuse(alternate);
        if (m.role == "user") {
          out += "[INST] " + m.content + " [/INST]";
        } else if (m.role == "assistant") {
          out += m.content + eos_ + (eos_then_space_ ? " " : "");
        } else {
          refuse("messages: the mistral chat template supports only user and assistant roles");
        }
      }
      break;
    }
  }
  return out;
}

std::optional<ChatTemplate> load_chat_template(const std::string& model_dir,
                                               const std::string& override_name,
                                               const Tokenizer* tokenizer, std::string* why_not) {
  namespace fs = std::filesystem;
  json config;
  std::string config_path;
  if (!model_dir.empty()) {
    fs::path dir(model_dir);
    if (fs::is_regular_file(dir)) dir = dir.parent_path();
    const fs::path p = dir / "tokenizer_config.json";
    if (fs::is_regular_file(p)) {
      config_path = p.string();
      std::ifstream in(p);
      try {
        config = json::parse(in);
      } catch (const json::exception& e) {
        fail("serve", config_path, ": not valid JSON (", e.what(), ")");
      }
    }
  }
  auto special = [&](const char* key, int32_t id) -> std::string {
    if (config.is_object() && config.contains(key)) {
      std::string s = token_text(config[key]);
      if (!s.empty()) return s;
    }
    if (tokenizer && id >= 0) return tokenizer->id_to_piece(id);
    return "";
  };
  const std::string bos = special("bos_token", tokenizer ? tokenizer->bos_id() : -1);
  const std::string eos = special("eos_token", tokenizer ? tokenizer->eos_id() : -1);

  if (!override_name.empty()) {
    auto f = chat_family_from_name(override_name);
    if (!f) {
      fail("serve", "--chat-template ", override_name,
           ": unknown template; use llama-2, llama-3, chatml or mistral");
    }
    return ChatTemplate(*f, bos, eos);
  }
  std::string source;
  if (config.is_object() && config.contains("chat_template")) {
    const json& t = config["chat_template"];
    if (t.is_string()) {
      source = t.get<std::string>();
    } else if (t.is_array()) {
      for (const json& e : t) {
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
            e["template"].is_string())
          source = e["template"].get<std::string>();
      }
    }
  }
  if (source.empty()) {
    if (why_not) {
      *why_not = config_path.empty()
                     ? "this model has no tokenizer_config.json with a chat_template; start the "
                       "server with --chat-template llama-2|llama-3|chatml|mistral"
                     : config_path +
                           " has no chat_template; start the server with "
                           "--chat-template llama-2|llama-3|chatml|mistral";
    }
    return std::nullopt;
  }
  auto f = detect_chat_family(source);
  if (!f) {
    if (why_not) {
      *why_not = config_path +
                 ": chat_template is not one of the supported families (llama-2, llama-3, "
                 "chatml, mistral); start the server with --chat-template NAME";
    }
    return std::nullopt;
  }
  return ChatTemplate(*f, bos, eos, source);
}

}  // namespace parallm::server
