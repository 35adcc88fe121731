// The official `openai` npm client against a parallm server (run by openai_client_test.sh, which
// installs the pinned package). Checks: greedy completion text (against --expected), streamed
// deltas concatenate to the non-streamed text, usage, the first chat delta's role, and that each
// error case raises the client's typed error (maxRetries: 0: nothing is retried).
//
//   node openai_client_test.mjs --base-url http://127.0.0.1:8000 [--expected FILE]
//        [--prompt TEXT] [--max-tokens N] [--api-key KEY]
import fs from 'node:fs';
import OpenAI from 'openai';

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const baseURL = (args['base-url'] || 'http://127.0.0.1:8000').replace(/\/$/, '') + '/v1';
const prompt = args.prompt ?? 'Once upon a time';
const maxTokens = Number(args['max-tokens'] ?? 16);
const apiKey = args['api-key'] || 'none';
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120000 });

let failures = 0, checks = 0;
function check(cond, what) {
  checks++;
  if (!cond) { failures++; console.log(`FAIL: ${what}`); } else console.log(`ok: ${what}`);
}
async function expectError(cls, fn, what) {
  try {
    await fn();
    check(false, `${what}: expected ${cls.name}, got a result`);
  } catch (e) {
    check(e instanceof cls, `${what}: ${cls.name} (got ${e?.constructor?.name} ${e?.status}: ${e?.message})`);
    return e;
  }
}

const models = await client.models.list();
const model = models.data[0].id;
check(typeof model === 'string' && model.length > 0, `models.list gives a model (${model})`);

// Completions: greedy text, streaming deltas, usage.
const whole = await client.completions.create({ model, prompt, max_tokens: maxTokens, temperature: 0 });
const text = whole.choices[0].text;
if (args.expected) {
  const want = fs.readFileSync(args.expected, 'utf8');
  check(text === want, `greedy completion equals the expected text (${JSON.stringify(text)} vs ${JSON.stringify(want)})`);
}
check(whole.usage.completion_tokens <= maxTokens && whole.usage.total_tokens === whole.usage.prompt_tokens + whole.usage.completion_tokens, 'completion usage adds up');
let streamed = '', usage = null, finish = null;
for await (const chunk of await client.completions.create({ model, prompt, max_tokens: maxTokens, temperature: 0, stream: true, stream_options: { include_usage: true } })) {
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) { streamed += c.text; if (c.finish_reason) finish = c.finish_reason; }
}
check(streamed === text, 'streamed completion deltas concatenate to the non-streamed text');
check(usage && JSON.stringify(usage) === JSON.stringify(whole.usage), 'streamed usage equals the non-streamed usage');
check(finish === whole.choices[0].finish_reason, `finish_reason matches (${finish})`);

// Chat.
const messages = [{ role: 'user', content: 'Tell me a story.' }];
const chat = await client.chat.completions.create({ model, messages, max_tokens: maxTokens, temperature: 0 });
const content = chat.choices[0].message.content;
check(chat.choices[0].message.role === 'assistant' && typeof content === 'string', 'chat answers as the assistant');
let deltas = '', first = true, roleFirst = false;
for await (const chunk of await client.chat.completions.create({ model, messages, max_tokens: maxTokens, temperature: 0, stream: true })) {
  for (const c of chunk.choices) {
    if (first) { roleFirst = c.delta.role === 'assistant'; first = false; }
    deltas += c.delta.content ?? '';
  }
}
check(roleFirst, 'the first chat delta carries role assistant');
check(deltas === content, 'streamed chat deltas concatenate to the non-streamed content');

// Stop strings are not returned.
if (text.length > 4) {
  const stop = text.slice(2, 4);
  const s = await client.completions.create({ model, prompt, max_tokens: maxTokens, temperature: 0, stop: [stop] });
  check(s.choices[0].text === text.slice(0, text.indexOf(stop)) && s.choices[0].finish_reason === 'stop', `stop ${JSON.stringify(stop)} ends the text before it`);
}

// Typed errors.
let e = await expectError(OpenAI.BadRequestError, () => client.completions.create({ model, prompt, max_tokens: 4, temperature: 7 }), 'temperature 7');
check(e?.param === 'temperature' || e?.error?.param === 'temperature', 'the error names param temperature');
await expectError(OpenAI.BadRequestError, () => client.completions.create({ model, prompt, max_tokens: 4, n: 2 }), 'n = 2');
await expectError(OpenAI.BadRequestError, () => client.completions.create({ model, prompt, max_tokens: 100000000 }), 'max_tokens over the context');
await expectError(OpenAI.BadRequestError, () => client.chat.completions.create({ model, messages: [] }), 'empty messages');
await expectError(OpenAI.NotFoundError, () => client.completions.create({ model: 'no-such-model', prompt, max_tokens: 4 }), 'unknown model');
if (args['api-key']) {
  const wrong = new OpenAI({ baseURL, apiKey: 'wrong-key', maxRetries: 0 });
  await expectError(OpenAI.AuthenticationError, () => wrong.models.list(), 'wrong API key');
}
console.log(`${checks - failures}/${checks} checks passed`);
process.exit(failures ? 1 : 0);
