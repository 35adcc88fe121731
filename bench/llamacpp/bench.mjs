// llama.cpp's side of scripts/bench-vs-llamacpp.sh, through node-llama-cpp's prebuilt CPU build
// (the best of its CPU variants for this machine is picked at load time).
// Usage: node bench.mjs MODEL.gguf THREADS PROMPT_LEN DECODE_TOKENS
// Prints one JSON line: prompt tokens/s (PROMPT_LEN tokens in one batch, as llama-bench's pp) and
// decode tokens/s (DECODE_TOKENS greedy steps after a 1-token prompt, as llama-bench's tg), each
// after one untimed run of the same work.
import {getLlama} from "node-llama-cpp";

const [modelPath, threadsArg, promptArg, decodeArg] = process.argv.slice(2);
const threads = Number(threadsArg), promptLen = Number(promptArg), decodeTokens = Number(decodeArg);
if (!modelPath || !(threads > 0) || !(promptLen > 0) || !(decodeTokens > 0)) {
  console.error("usage: node bench.mjs MODEL.gguf THREADS PROMPT_LEN DECODE_TOKENS");
  process.exit(2);
}
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath, useMmap: true});
const context = await model.createContext({
  contextSize: promptLen + decodeTokens + 16, threads, batchSize: promptLen, sequences: 1,
});
const sequence = context.getSequence();
// Token ids past the specials and the 256 byte pieces: any will do for timing.
const prompt = Array.from({length: promptLen}, (_, i) => 300 + (i * 7919) % 1500);

async function promptRate() {
  await sequence.clearHistory();
  const t0 = performance.now();
  await sequence.evaluateWithoutGeneratingNewTokens(prompt);
  return promptLen / ((performance.now() - t0) / 1000);
}

async function decodeRate() {
  await sequence.clearHistory();
  let n = 0, t0 = 0;
  // The first token out ends the 1-token prompt's evaluation; the clock starts there.
  for await (const token of sequence.evaluate([prompt[0]], {temperature: 0})) {
    if (n === 0) t0 = performance.now();
    if (++n > decodeTokens) break;
  }
  return decodeTokens / ((performance.now() - t0) / 1000);
}

await promptRate();
const prompt_tok_s = await promptRate();
await decodeRate();
const decode_tok_s = await decodeRate();
console.log(JSON.stringify({engine: "llama.cpp", model: modelPath, threads, prompt_len: promptLen,
                            prompt_tok_s, decode_tok_s}));
await context.dispose();
await model.dispose();
await llama.dispose();
