// Chat templates: OpenAI-style messages -> the prompt text a chat model was trained on.
//
// Hugging Face ships the template as a Jinja string (tokenizer_config.json's "chat_template");
// there is no Jinja engine here, so the families in use are written out in C++ and a model's
// string is recognised by what it contains (the markers each family's template spells). The
// rendering matches the reference templates byte for byte: tests/reference/chat_template_ref.py
// renders them with jinja2 into tests/reference/chat_template_golden.json, which
// tests/server/chat_template_test.cpp compares against.
//
// Families:
//   llama-2  "<<SYS>>" ... "[INST]" (Llama-2-chat): bos [INST] <<SYS>>\nsys\n<</SYS>>\n\nuser
//   [/INST] llama-3  "<|start_header_id|>" (Llama-3-Instruct) chatml   "<|im_start|>" (OpenHermes,
//   Qwen; Qwen's default system message when the template
//            has one)
//   mistral  "[INST]" without "<<SYS>>" (Mistral-7B-Instruct v0.1 / v0.2)
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace parallm {
class Tokenizer;
}

namespace parallm::server {

struct ChatMessage {
  std::string role;     // system, user, assistant
  std::string content;  // text parts already joined
};

enum class ChatFamily { Llama2, Llama3, ChatML, Mistral };

// "llama-2", "llama-3", "chatml", "mistral".
const char* chat_family_name(ChatFamily f);
// The family for a name as above; nullopt for any other.
std::optional<ChatFamily> chat_family_from_name(const std::string& name);
// The family whose markers a Jinja template string contains; nullopt if none.
std::optional<ChatFamily> detect_chat_family(const std::string& jinja);

class ChatTemplate {
 public:
  // `source` is the Jinja string it came from ("" for an override by name): the variants
  // inside a family (Qwen's default system message, Mistral v0.1's space after EOS) are read
  // from it.
  ChatTemplate(ChatFamily family, std::string bos_token, std::string eos_token,
               const std::string& source = "");

  // The prompt text; `add_generation_prompt` opens the assistant's turn. Throws
  // std::invalid_argument (the server's 400, param "messages") for conversations the family
  // refuses (roles out of order, a role it does not know, no messages).
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

  ChatFamily family() const { return family_; }
  const std::string& bos_token() const { return bos_; }
  const std::string& eos_token() const { return eos_; }

 private:
  ChatFamily family_;
  std::string bos_, eos_;
  std::string default_system_;   // chatml (Qwen): the system turn added when there is none
  bool eos_then_space_ = false;  // mistral v0.1: "content + eos_token + ' '"
};

// The template for a model: `override_name` (a family name) wins; else `model_dir`'s
// tokenizer_config.json "chat_template" (a string, or a list of {name, template} whose "default"
// entry is used) by detect_chat_family. BOS/EOS text comes from tokenizer_config.json's
// bos_token/eos_token, else the tokenizer's pieces. Returns nullopt with `why_not` set when the
// model has no usable template (chat requests then answer 400 with that message). Throws
// std::invalid_argument for an unknown override name.
std::optional<ChatTemplate> load_chat_template(const std::string& model_dir,
                                               const std::string& override_name,
                                               const Tokenizer* tokenizer, std::string* why_not);

}  // namespace parallm::server
