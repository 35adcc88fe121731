// llama.cpp's greedy tokens for scripts/compare-llamacpp.sh, through node-llama-cpp.
// Usage: node greedy.mjs MODEL.gguf PROMPT_IDS(1,2,3) N  -> prints N token ids, comma-separated.
import {getLlama} from "node-llama-cpp";

const [modelPath, idsArg, nArg] = process.argv.slice(2);
const prompt = (idsArg || "").split(",").filter((s) => s !== "").map(Number);
const n = Number(nArg);
if (!modelPath || prompt.length === 0 || prompt.some((t) => !Number.isInteger(t)) || !(n > 0)) {
  console.error("usage: node greedy.mjs MODEL.gguf PROMPT_IDS N");
  process.exit(2);
}
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: prompt.length + n + 8, sequences: 1});
const sequence = context.getSequence();
const out = [];
for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
  out.push(token);
  if (out.length >= n) break;
}
console.log(out.join(","));
await context.dispose();
await model.dispose();
await llama.dispose();
