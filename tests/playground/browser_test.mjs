// Browser test of `parallm playground` in headless Chromium (playwright-core, pinned in
// package.json): the page loads, controls change the numbers, the numbers equal the API's, a real
// trace loads, and bad input shows a message (never a blank page) while the API answers 400.
// Screenshots go to OUT_DIR.
//
//   node browser_test.mjs URL TRAIN_TRACE_JSON OUT_DIR GENERATE_TRACE_JSON
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const [url, tracePath, outDir, genTracePath] = process.argv.slice(2);
mkdirSync(outDir, { recursive: true });
const failures = [];
function check(cond, what) {
  console.log((cond ? 'ok   ' : 'FAIL ') + what);
  if (!cond) failures.push(what);
}
async function api(path, body) {
  const r = await fetch(url + path, { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: typeof body === 'string' ? body : JSON.stringify(body) });
  return { status: r.status, json: await r.json() };
}

const browser = await chromium.launch({
  executablePath: process.env.PARALLM_CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on('pageerror', (e) => failures.push('uncaught page error: ' + e.message));
  await page.goto(url);
  await page.waitForSelector('body[data-ready="1"]', { timeout: 20000 });
  const text = (sel) => page.locator(sel).first().innerText();
  // Sets a control and fires its change event, as a user's edit does.
  async function set(sel, value) {
    const tag = await page.locator(sel).evaluate((e) => e.tagName);
    if (tag === 'SELECT') await page.selectOption(sel, String(value));
    else await page.fill(sel, String(value));
    await page.locator(sel).dispatchEvent('change');
  }
  async function waitText(sel, want, what) {
    try {
      await page.waitForFunction(([s, w]) => {
        const e = document.querySelector(s);
        return e && e.offsetParent !== null && e.textContent.trim() === w;
      }, [sel, want], { timeout: 10000 });
      check(true, what);
    } catch (e) {
      check(false, `${what}: ${sel} shows ${JSON.stringify(await text(sel).catch(() => null))}, ` +
        `want ${JSON.stringify(want)}`);
    }
  }
  async function waitError(sel, needle, what) {
    try {
      await page.waitForFunction(([s, n]) => {
        const e = document.querySelector(s);
        return e && !e.hidden && e.textContent.includes(n);
      }, [sel, needle], { timeout: 10000 });
      const bodyText = await page.locator('body').innerText();
      check(bodyText.length > 200, `${what}: message shown, page not blank`);
    } catch (e) {
      check(false, `${what}: no message containing ${JSON.stringify(needle)} in ${sel}`);
    }
  }

  // ---- Split a model ----
  const base = { model: 'llama-2-7b', gpu: 'a100-80g', gpus: 8, nodes: 1, goal: 'latency',
    dtype: 'fp16', batch: 1, prompt_len: 512, output_len: 128 };
  let r = await api('/api/plan', base);
  await waitText('#plan-table tbody tr:first-child td[data-key=tpot_ms]',
    r.json.layouts[0].tpot_ms.toFixed(3), 'plan: first layout TPOT equals the API');
  check(await page.locator('#plan-table tbody tr').count() === r.json.layouts.length,
    `plan: ${r.json.layouts.length} layouts in the table`);
  check(await page.locator('#plan-mem rect.seg').count() > 0 &&
    await page.locator('#plan-time rect.seg').count() > 0, 'plan: memory and time bars drawn');
  await page.screenshot({ path: `${outDir}/01-split-a-model.png`, fullPage: true });

  await set('#plan-gpus', 4);
  await set('#plan-batch', 16);
  r = await api('/api/plan', { ...base, gpus: 4, batch: 16 });
  await waitText('#plan-table tbody tr:first-child td[data-key=tpot_ms]',
    r.json.layouts[0].tpot_ms.toFixed(3), 'plan: 4 devices, batch 16 moves the TPOT to the API\'s');
  await waitText('#plan-table tbody tr:first-child td[data-key=tokens_per_s]',
    r.json.layouts[0].tokens_per_s.toFixed(1), 'plan: tokens/s equals the API');

  await set('#plan-mode', 'train');
  r = await api('/api/plan', { model: 'llama-2-7b', gpu: 'a100-80g', gpus: 4, nodes: 1,
    goal: 'latency', dtype: 'bf16', train: true, global_batch: 512, micro_batch: 1, seq_len: 4096,
    schedule: '1f1b' });
  await waitText('#plan-table tbody tr:first-child td[data-key=step_time_s]',
    r.json.layouts[0].step_time_s.toFixed(2), 'plan: training step time equals the API');
  await page.screenshot({ path: `${outDir}/02-split-training.png`, fullPage: true });
  await set('#plan-mode', 'inference');

  await set('#plan-model', '__config');
  await page.fill('#plan-config', '{"hidden_size": 64}');
  await page.locator('#plan-config').dispatchEvent('input');
  await waitError('#plan-error', 'config', 'plan: an invalid config.json');
  r = await api('/api/plan', { config: '{"hidden_size": 64}' });
  check(r.status === 400 && r.json.error.includes('config'), 'API: invalid config -> 400');
  await page.screenshot({ path: `${outDir}/03-bad-config.png`, fullPage: true });

  await set('#plan-model', 'llama-2-7b');
  await page.fill('#plan-topology', 'this is not nvidia-smi topo -m output');
  await page.locator('#plan-topology').dispatchEvent('input');
  await waitError('#plan-error', 'topology', 'plan: a topology that is not one');
  r = await api('/api/plan', { model: 'llama-2-7b', topology: 'this is not nvidia-smi topo -m output' });
  check(r.status === 400 && r.json.error.includes('topology'), 'API: bad topology -> 400');
  await page.screenshot({ path: `${outDir}/04-bad-topology.png`, fullPage: true });
  await page.fill('#plan-topology', '');
  await page.locator('#plan-topology').dispatchEvent('input');

  await set('#plan-gpus', 64);
  await set('#plan-pp', 64);
  await waitError('#plan-error', 'PP=64 exceeds the 32 layers', 'plan: PP 64 > 32 layers');
  r = await api('/api/plan', { ...base, gpus: 64, pp: 64 });
  check(r.status === 400 && r.json.error.includes('exceeds'), 'API: pp > layers -> 400');
  await page.fill('#plan-pp', '');
  await set('#plan-gpus', 8);

  // ---- Watch a pipeline ----
  await set('#sched-schedule', 'zb-h1');
  r = await api('/api/schedule', { p: 4, m: 8, v: 1, schedule: 'zb-h1', layers: 32, forward: 1,
    backward: 2 });
  await waitText('#sched-bubble', r.json.bubble_fraction.toFixed(4),
    'pipeline: zb-h1 bubble equals the API');
  await waitText('#sched-formula-value', r.json.formula_bubble.toFixed(4),
    'pipeline: formula value equals the API');
  check(await page.locator('#sched-svg rect.act-W').count() === 32,
    'pipeline: 32 W blocks drawn (4 stages x 8 micro-batches)');
  check((await text('#sched-inflight tbody tr:first-child td[data-key=peak_in_flight]')) ===
    String(r.json.stages[0].peak_in_flight), 'pipeline: in-flight equals the API');
  await page.locator('#pipeline').screenshot({ path: `${outDir}/05-pipeline-zb-h1.png` });

  await set('#sched-schedule', 'interleaved');
  await set('#sched-v', 2);
  r = await api('/api/schedule', { p: 4, m: 8, v: 2, schedule: 'interleaved', layers: 32,
    forward: 1, backward: 2 });
  await waitText('#sched-bubble', r.json.bubble_fraction.toFixed(4),
    'pipeline: interleaved V=2 bubble equals the API');
  const all = await page.locator('#sched-svg rect.act').count();
  await page.locator('#sched-slider').fill('300');
  await page.locator('#sched-slider').dispatchEvent('input');
  const part = await page.locator('#sched-svg rect.act').count();
  check(part > 0 && part < all, `pipeline: the time slider at 30% draws ${part} of ${all} actions`);
  check((await text('#sched-now')).includes('stage 0:'), 'pipeline: what runs now is named');
  await page.locator('#pipeline').screenshot({ path: `${outDir}/06-pipeline-step-through.png` });

  await set('#sched-layers', 4);
  await waitError('#sched-error', 'layers', 'pipeline: p x V > layers');
  r = await api('/api/schedule', { p: 4, v: 2, schedule: 'interleaved', layers: 4 });
  check(r.status === 400 && r.json.error.includes('layers'), 'API: p x V > layers -> 400');
  await page.locator('#pipeline').screenshot({ path: `${outDir}/07-pipeline-too-many-stages.png` });
  await set('#sched-layers', 32);

  // ---- See a real run ----
  const fs = await import('node:fs');
  const traceText = fs.readFileSync(tracePath, 'utf8');
  const t = await api('/api/trace', traceText);
  await page.setInputFiles('#trace-file', tracePath);
  await waitText('#trace-bubble', t.json.measured_bubble.toFixed(4),
    'trace: measured bubble equals the API');
  const s = await api('/api/schedule', t.json.simulate);
  await waitText('#trace-sim-bubble', s.json.bubble_fraction.toFixed(4),
    'trace: the simulator\'s bubble beside it equals the API');
  check(await page.locator('#trace-svg rect.act-F').count() === 8,
    'trace: 8 forward blocks of the last step drawn (2 ranks x 4 micro-batches)');
  await page.locator('#trace').screenshot({ path: `${outDir}/08-real-run.png` });
  const g = await api('/api/trace', fs.readFileSync(genTracePath, 'utf8'));
  await page.setInputFiles('#trace-file', genTracePath);
  await waitText('#trace-bubble', g.json.measured_bubble.toFixed(4),
    'trace: a generate --tp 2 trace\'s measured bubble equals the API');
  await waitText('#trace-sim-bubble', 'n/a', 'trace: no simulator bubble without pipeline actions');
  check(await page.locator('#trace-svg rect.act-comm').count() > 0,
    'trace: its collectives drawn');
  await page.locator('#trace').screenshot({ path: `${outDir}/08b-real-run-generate-tp2.png` });
  await page.setInputFiles('#trace-file', { name: 'bad.json', mimeType: 'application/json',
    buffer: Buffer.from('{"not": "a trace"}') });
  await waitError('#trace-error', 'traceEvents', 'trace: a file that is not a trace');

  // ---- Watch a layer split ----
  await set('#split-tp', 4);
  r = await api('/api/layer-split', { model: 'llama-2-7b', tp: 4, dtype: 'fp16', link: 'nvlink4' });
  await waitText('#split-bytes', String(r.json.bytes_sent_per_token),
    'layer split: bytes per token equal the API');
  await waitText('#split-shards tr[data-weight=q_proj] td[data-key=shape]', '[1024, 4096]',
    'layer split: q_proj shard at TP 4 is [1024, 4096]');
  check(await page.locator('#split-rank').inputValue() === '0', 'layer split: rank 0 chosen');
  await set('#split-rank', 3);
  await waitText('#split-shards tr[data-weight=embed_tokens] td:last-child', 'tokens 24000..31999',
    'layer split: rank 3 holds the last quarter of the vocabulary');
  await page.locator('#layer').screenshot({ path: `${outDir}/09-layer-split.png` });
  await set('#split-tp', 3);
  await waitError('#split-error', 'does not split', 'layer split: TP 3 on 32 heads');
  await page.screenshot({ path: `${outDir}/10-whole-page.png`, fullPage: true });
} finally {
  await browser.close();
}
console.log(`${failures.length} failure(s)`);
for (const f of failures) console.log('  ' + f);
process.exit(failures.length ? 1 : 0);
