// parallm playground: the page's logic. Plain JavaScript, no libraries; every number shown comes
// from the server's JSON API (the same code as `parallm plan` and `parallm schedule`).
'use strict';

const $ = (id) => document.getElementById(id);
const SVG_NS = 'http://www.w3.org/2000/svg';
const COLOURS = { F: '#4c78a8', B: '#59a14f', W: '#f28e2b', compute: '#4c78a8', comm: '#e15759',
  p2p: '#f28e2b', wait: '#bab0ac' };

// ---- plumbing ----

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: typeof body === 'string' ? body : JSON.stringify(body) };
  const r = await fetch(path, init);
  let j;
  try {
    j = await r.json();
  } catch (e) {
    throw new Error(`${path}: HTTP ${r.status}, and the answer is not JSON`);
  }
  if (!r.ok) throw new Error(j.error || `${path}: HTTP ${r.status}`);
  return j;
}

function showError(id, err) {
  const box = $(id);
  if (!err) { box.hidden = true; box.textContent = ''; return; }
  box.textContent = String(err.message || err);
  box.hidden = false;
}

// Runs fn after the controls settle; a newer run makes an older answer stale (never shown).
function debounced(fn, ms = 200) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}
function latestOnly(fn) {
  let seq = 0;
  return async (...args) => {
    const mine = ++seq;
    return fn(() => mine === seq, ...args);
  };
}

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svgEl(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function intOf(id) { return parseInt($(id).value, 10); }
function numOf(id) { return parseFloat($(id).value); }
const GiB = 1024 ** 3;
const fmt = {
  ms: (x) => x.toFixed(3), gib: (x) => (x / GiB).toFixed(2), pct: (x) => (100 * x).toFixed(1) + '%',
  frac: (x) => x.toFixed(4),
};

window.addEventListener('error', (e) => showError('global-error', e.message));
window.addEventListener('unhandledrejection', (e) => showError('global-error', e.reason));

// ---- the timeline (pipeline simulator and real traces) ----

// rows: [{label, items: [{type|cat, label, start, end}], right}]; cursor: time drawn up to.
function drawTimeline(container, rows, makespan, cursor = Infinity) {
  const width = 1000, left = 80, rowH = 26, right = 110;
  const scale = width / Math.max(makespan, 1e-12);
  const svg = svgEl('svg', { width: left + width + right, height: 20 + rows.length * rowH + 24,
    class: 'timeline' });
  rows.forEach((row, i) => {
    const y = 10 + i * rowH;
    svg.appendChild(svgEl('text', { x: 4, y: y + 16 }, row.label));
    svg.appendChild(svgEl('rect', { x: left, y, width, height: rowH - 6, fill: '#f3f3f3',
      class: 'idle' }));
    for (const a of row.items) {
      if (a.start >= cursor) continue;
      const end = Math.min(a.end, cursor);
      const x = left + a.start * scale, w = Math.max((end - a.start) * scale, 0.5);
      const kind = a.type || a.cat;
      const r = svgEl('rect', { x, y, width: w, height: rowH - 6, fill: COLOURS[kind] || '#999',
        stroke: '#fff', 'stroke-width': 0.5, class: 'act act-' + kind, 'data-label': a.label });
      r.appendChild(svgEl('title', {}, `${a.label}: ${a.start.toPrecision(4)} .. ${a.end.toPrecision(4)}`));
      svg.appendChild(r);
      if (w > 18 && a.label.length * 7 < w)
        svg.appendChild(svgEl('text', { x: x + 2, y: y + 14, fill: '#fff' }, a.label));
    }
    if (row.right) svg.appendChild(svgEl('text', { x: left + width + 6, y: y + 16 }, row.right));
  });
  if (cursor < makespan) {
    const x = left + cursor * scale;
    svg.appendChild(svgEl('line', { x1: x, x2: x, y1: 4, y2: 14 + rows.length * rowH,
      stroke: '#000', 'stroke-dasharray': '3 2' }));
  }
  const ly = 24 + rows.length * rowH;
  let lx = left;
  const spans = rows.some((row) => row.items.some((a) => !a.type));
  const legend = spans
    ? [['compute', 'compute'], ['comm', 'collective'], ['p2p', 'send/recv'], ['wait', 'wait']]
    : [['F', 'forward'], ['B', 'backward (B)'], ['W', 'weight grad (W)']];
  for (const [k, name] of legend) {
    svg.appendChild(svgEl('rect', { x: lx, y: ly - 9, width: 10, height: 10, fill: COLOURS[k] }));
    svg.appendChild(svgEl('text', { x: lx + 14, y: ly }, name));
    lx += 130;
  }
  svg.appendChild(svgEl('rect', { x: lx, y: ly - 9, width: 10, height: 10, fill: '#f3f3f3',
    stroke: '#ccc' }));
  svg.appendChild(svgEl('text', { x: lx + 14, y: ly }, 'idle'));
  container.replaceChildren(svg);
}

// ---- Split a model ----

let presets = null;

function planBody() {
  const b = {};
  if ($('plan-model').value === '__config') b.config = $('plan-config').value;
  else b.model = $('plan-model').value;
  b.gpu = $('plan-gpu').value;
  b.gpus = intOf('plan-gpus');
  b.nodes = intOf('plan-nodes');
  if ($('plan-link').value) b.link = $('plan-link').value;
  if ($('plan-inter-node').value) b.inter_node = $('plan-inter-node').value;
  for (const k of ['tp', 'pp'])  // blank: any degree
    if ($('plan-' + k).value.trim() !== '') b[k] = intOf('plan-' + k);
  const topo = $('plan-topology').value;
  if (topo.trim()) b.topology = topo;
  b.goal = $('plan-goal').value;
  b.dtype = $('plan-dtype').value;
  if ($('plan-mode').value === 'train') {
    b.train = true;
    b.global_batch = intOf('plan-global-batch');
    b.micro_batch = intOf('plan-micro-batch');
    b.seq_len = intOf('plan-seq-len');
    b.schedule = $('plan-schedule').value;
  } else {
    b.batch = intOf('plan-batch');
    b.prompt_len = intOf('plan-prompt-len');
    b.output_len = intOf('plan-output-len');
  }
  for (const [k, v] of Object.entries(b))
    if (typeof v === 'number' && !Number.isFinite(v))
      throw new Error(`${k}: enter a number`);
  return b;
}

// Time of a token (inference) or a step (training) by kind, from the layout's breakdown.
function timeSplit(l, training) {
  const parts = { 'compute/memory': 0, 'TP all-reduce': 0, 'PP hand-offs': 0, bubble: 0,
    'DP/other': 0 };
  for (const t of l.breakdown || []) {
    const n = t.name;
    if (n.includes('bubble')) parts.bubble += t.ms;
    else if (n.startsWith('tp')) parts['TP all-reduce'] += t.ms;
    else if (n.startsWith('pp')) parts['PP hand-offs'] += t.ms;
    else if (n.startsWith('dp') || n.startsWith('ep')) parts['DP/other'] += t.ms;
    else parts['compute/memory'] += t.ms;
  }
  const total = training ? l.step_time_s * 1000 : l.tpot_ms;
  const sum = Object.values(parts).reduce((a, b) => a + b, 0);
  // What the terms leave of the total: micro-batches queueing at stages (inference) is bubble.
  if (total > sum) parts.bubble += total - sum;
  return { parts, total };
}

const TIME_COLOURS = { 'compute/memory': '#4c78a8', 'TP all-reduce': '#e15759',
  'PP hand-offs': '#f28e2b', bubble: '#bab0ac', 'DP/other': '#b07aa1' };
const MEM_PARTS = [['weights', 'weights_bytes_per_device', '#4c78a8'],
  ['KV cache', 'kv_cache_bytes_per_device', '#f28e2b'],
  ['activations', 'activation_bytes_per_device', '#59a14f'],
  ['gradients', 'gradient_bytes_per_device', '#b07aa1'],
  ['optimizer', 'optimizer_bytes_per_device', '#e15759']];

function layoutName(l) {
  const ep = l.experts_over_tp ? ' ep=tp' : l.ep > 1 ? ` ep${l.ep}` : '';
  return `tp${l.tp} pp${l.pp} dp${l.dp}` + ep;
}

function stackedBars(container, rows, max, legend, unit, fmtv, capacity) {
  const left = 130, width = 640, rowH = 22;
  const svg = svgEl('svg', { width: left + width + 160, height: 30 + rows.length * rowH });
  const scale = width / Math.max(max, 1e-12);
  rows.forEach((row, i) => {
    const y = 6 + i * rowH;
    svg.appendChild(svgEl('text', { x: 4, y: y + 13 }, row.label));
    let x = left;
    for (const [name, v, colour] of row.parts) {
      if (!(v > 0)) continue;
      const r = svgEl('rect', { x, y, width: v * scale, height: rowH - 6, fill: colour,
        class: 'seg', 'data-part': name, 'data-value': v });
      r.appendChild(svgEl('title', {}, `${name}: ${fmtv(v)} ${unit}`));
      svg.appendChild(r);
      x += v * scale;
    }
    svg.appendChild(svgEl('text', { x: x + 4, y: y + 13 }, `${fmtv(row.total)} ${unit}`));
    if (capacity) {
      const cx = left + capacity * scale;
      svg.appendChild(svgEl('line', { x1: cx, x2: cx, y1: y - 2, y2: y + rowH - 4, stroke: '#000',
        'stroke-width': 2 }));
    }
  });
  const ly = 22 + rows.length * rowH;
  let lx = left;
  for (const [name, colour] of legend) {
    svg.appendChild(svgEl('rect', { x: lx, y: ly - 9, width: 10, height: 10, fill: colour }));
    svg.appendChild(svgEl('text', { x: lx + 14, y: ly }, name));
    lx += 14 + name.length * 7 + 16;
  }
  if (capacity) svg.appendChild(svgEl('text', { x: lx, y: ly }, '| usable memory'));
  container.replaceChildren(svg);
}

function renderPlan(r) {
  const training = r.workload.mode === 'training';
  const layouts = r.layouts;
  $('plan-summary').textContent = `${r.model}: ${(r.params / 1e9).toFixed(2)} B parameters on ` +
    `${r.hardware.devices} x ${r.hardware.device} (${r.hardware.nodes} node(s)); ` +
    `${training ? 'training' : 'inference'}, goal ${r.goal}. ${layouts.length} layouts` +
    (r.rejected.length ? `, ${r.rejected.length} rejected` : '') + '.';
  const cols = [['#', null], ['tp', 'tp'], ['pp', 'pp'], ['dp', 'dp'], ['ep', 'ep'],
    ['fits', 'fits'], ['feasible', 'feasible']];
  if (training)
    cols.push(['step s', 'step_time_s', (x) => x.toFixed(2)],
      ['tokens/s', 'tokens_per_s', (x) => x.toFixed(0)], ['MFU', 'mfu', fmt.pct],
      ['bubble', 'bubble_fraction', fmt.pct]);
  else
    cols.push(['TPOT ms', 'tpot_ms', fmt.ms], ['TTFT ms', 'ttft_ms', fmt.ms],
      ['tokens/s', 'tokens_per_s', (x) => x.toFixed(1)]);
  cols.push(['memory GiB', 'total_bytes_per_device', fmt.gib]);
  const thead = $('plan-table').tHead, tbody = $('plan-table').tBodies[0];
  const hr = el('tr');
  for (const [name] of cols) hr.appendChild(el('th', {}, name));
  thead.replaceChildren(hr);
  tbody.replaceChildren();
  layouts.forEach((l, i) => {
    const tr = el('tr', { class: (i === 0 && l.feasible ? 'best' : '') +
      (l.feasible ? '' : ' infeasible'), 'data-rank': i });
    for (const [, key, f] of cols) {
      const v = key === null ? i + 1 : l[key];
      tr.appendChild(el('td', key ? { 'data-key': key } : {},
        f ? f(v) : typeof v === 'boolean' ? (v ? 'yes' : 'no') : String(v)));
    }
    tbody.appendChild(tr);
  });
  const shown = layouts.slice(0, 12);
  const memRows = shown.map((l) => {
    const parts = MEM_PARTS.map(([n, k, c]) => [n, (l[k] || 0) / GiB, c]);
    return { label: layoutName(l), parts, total: l.total_bytes_per_device / GiB };
  });
  const memMax = Math.max(...memRows.map((x) => x.total),
    ...shown.map((l) => l.usable_bytes_per_device / GiB));
  stackedBars($('plan-mem'), memRows, memMax, MEM_PARTS.map(([n, , c]) => [n, c]), 'GiB',
    (x) => x.toFixed(2), shown.length ? shown[0].usable_bytes_per_device / GiB : 0);
  const timeRows = shown.map((l) => {
    const { parts, total } = timeSplit(l, training);
    return { label: layoutName(l), total,
      parts: Object.entries(parts).map(([n, v]) => [n, v, TIME_COLOURS[n]]) };
  });
  $('plan-time-title').textContent = training ? 'Time per step (ms)' : 'Time per token (ms)';
  stackedBars($('plan-time'), timeRows, Math.max(...timeRows.map((x) => x.total)),
    Object.entries(TIME_COLOURS), 'ms', (x) => x.toFixed(3));
  const ul = $('plan-reasons');
  ul.replaceChildren();
  layouts.forEach((l, i) => {
    if (i === 0 && l.feasible) return;
    ul.appendChild(el('li', {}, `${layoutName(l)}: ` +
      (l.reasons.length ? l.reasons.join('; ') : 'slower on the goal')));
  });
  for (const j of r.rejected)
    ul.appendChild(el('li', {}, `${layoutName(j)}: cannot run: ${j.why}`));
  $('plan-out').hidden = false;
}

const runPlan = latestOnly(async (current) => {
  try {
    const r = await api('/api/plan', planBody());
    if (!current()) return;
    showError('plan-error', null);
    renderPlan(r);
  } catch (e) {
    if (!current()) return;
    showError('plan-error', e);
    $('plan-out').hidden = true;
  }
});

// ---- Watch a pipeline ----

let sched = null;

function scheduleBody() {
  return { p: intOf('sched-p'), m: intOf('sched-m'), v: intOf('sched-v'),
    schedule: $('sched-schedule').value, layers: intOf('sched-layers'),
    forward: numOf('sched-forward'), backward: numOf('sched-backward') };
}

function drawSchedule() {
  if (!sched) return;
  const t = sched.makespan * intOf('sched-slider') / 1000;
  $('sched-time').textContent = `t = ${t.toFixed(2)} of ${sched.makespan}`;
  const rows = sched.stages.map((s) => ({ label: `stage ${s.stage}`, items: s.actions,
    right: `idle ${(s.idle / sched.makespan * 100).toFixed(1)}%` }));
  drawTimeline($('sched-svg'), rows, sched.makespan, t);
  const now = sched.stages.map((s) => {
    const a = s.actions.find((x) => x.start <= t && t < x.end);
    return `stage ${s.stage}: ${a ? a.label : 'idle'}`;
  });
  $('sched-now').textContent = t < sched.makespan ? `at t = ${t.toFixed(2)}: ` + now.join(', ')
    : 'end of the step';
}

const runSchedule = latestOnly(async (current) => {
  try {
    const b = scheduleBody();
    for (const [k, v] of Object.entries(b))
      if (typeof v === 'number' && !Number.isFinite(v)) throw new Error(`${k}: enter a number`);
    const r = await api('/api/schedule', b);
    if (!current()) return;
    sched = r;
    showError('sched-error', null);
    $('sched-bubble').textContent = fmt.frac(r.bubble_fraction);
    $('sched-formula-value').textContent = fmt.frac(r.formula_bubble);
    $('sched-formula').textContent = r.formula_text.trim();
    $('sched-makespan').textContent = String(r.makespan);
    $('sched-inflight-formula').textContent = 'Formula: ' + r.in_flight_formula_text;
    const tbody = $('sched-inflight').tBodies[0];
    tbody.replaceChildren();
    for (const s of r.stages) {
      const tr = el('tr', { 'data-stage': s.stage });
      tr.appendChild(el('td', {}, String(s.stage)));
      tr.appendChild(el('td', { 'data-key': 'peak_in_flight' }, String(s.peak_in_flight)));
      tr.appendChild(el('td', { 'data-key': 'peak_in_flight_formula' },
        String(s.peak_in_flight_formula)));
      tr.appendChild(el('td', {}, String(s.busy)));
      tr.appendChild(el('td', {}, String(s.idle)));
      tbody.appendChild(tr);
    }
    $('sched-out').hidden = false;
    drawSchedule();
  } catch (e) {
    if (!current()) return;
    showError('sched-error', e);
    $('sched-out').hidden = true;
    sched = null;
  }
});

// ---- See a real run ----

async function loadTrace(file) {
  try {
    const text = await file.text();
    const r = await api('/api/trace', text);
    showError('trace-error', null);
    $('trace-bubble').textContent = fmt.frac(r.measured_bubble);
    $('trace-over').textContent = `(${r.bubble_measured_over}, ${r.ranks_count} rank(s))`;
    const stageOf = new Map((r.rank_stages || []).map((x) => [x.rank, x.stage]));
    const rows = r.ranks.map((k) => ({
      label: stageOf.has(k.rank) ? `rank ${k.rank} s${stageOf.get(k.rank)}` : `rank ${k.rank}`,
      items: r.pipeline ? k.actions : k.spans.map((x) => ({ ...x, label: x.name })), right: `idle ${(k.bubble * 100).toFixed(1)}%` }));
    const tbody = $('trace-ranks').tBodies[0];
    tbody.replaceChildren();
    for (const k of r.ranks) {
      const tr = el('tr');
      for (const v of [k.rank, k.spans.length, (k.busy_us / 1000).toFixed(3),
        (k.idle_us / 1000).toFixed(3), fmt.frac(k.bubble)])
        tr.appendChild(el('td', {}, String(v)));
      tbody.appendChild(tr);
    }
    drawTimeline($('trace-svg'), rows, r.window_us);
    if (r.pipeline) {
      const s = await api('/api/schedule', r.simulate);
      $('trace-sim-bubble').textContent = fmt.frac(s.bubble_fraction);
      $('trace-sim-name').textContent = `(${s.name}, the stages' measured times replayed)`;
    } else {
      $('trace-sim-bubble').textContent = 'n/a';
      $('trace-sim-name').textContent = '(one pipeline stage in this trace: nothing to ' +
        'simulate; a run with --pp 2 or more has F/B/W actions on each stage)';
    }
    $('trace-out').hidden = false;
  } catch (e) {
    showError('trace-error', e);
    $('trace-out').hidden = true;
  }
}

// ---- Watch a layer split ----

let split = null;

function drawSplit() {
  if (!split) return;
  const rank = intOf('split-rank') || 0;
  const shards = split.ranks[Math.min(rank, split.ranks.length - 1)].shards;
  const tbody = $('split-shards').tBodies[0];
  tbody.replaceChildren();
  for (const s of shards) {
    const tr = el('tr', { 'data-weight': s.name });
    tr.appendChild(el('td', { class: 'text' }, s.name));
    tr.appendChild(el('td', { 'data-key': 'shape' }, `[${s.shape.join(', ')}]`));
    tr.appendChild(el('td', {}, `[${s.full.join(', ')}]`));
    tr.appendChild(el('td', { class: 'text' }, s.split));
    tr.appendChild(el('td', { class: 'text' }, s.note));
    tbody.appendChild(tr);
  }
  // Each matrix of a layer as a box cut into the ranks' shards, the chosen rank's filled.
  const names = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
  const box = 110, gap = 24;
  const svg = svgEl('svg', { width: names.length * (box + gap) + 20, height: box + 50 });
  names.forEach((n, i) => {
    const x0 = 10 + i * (box + gap), y0 = 20;
    svg.appendChild(svgEl('text', { x: x0, y: 12 }, n));
    const byRows = shards.find((s) => s.name === n).split.startsWith('rows');
    let off = 0;
    split.ranks.forEach((rk, r) => {
      const s = rk.shards.find((x) => x.name === n);
      const full = byRows ? s.full[0] : s.full[1], part = byRows ? s.shape[0] : s.shape[1];
      const a = off / full * box, w = part / full * box;
      off = (off + part) % full;  // replicated KV heads wrap round
      svg.appendChild(svgEl('rect', byRows ? { x: x0, y: y0 + a, width: box, height: w }
        : { x: x0 + a, y: y0, width: w, height: box }));
      const last = svg.lastChild;
      last.setAttribute('fill', r === rank ? '#4c78a8' : '#e8e8e8');
      last.setAttribute('stroke', '#fff');
    });
    svg.appendChild(svgEl('text', { x: x0, y: y0 + box + 14 },
      shards.find((s) => s.name === n).shape.join(' x ')));
  });
  $('split-svg').replaceChildren(svg);
}

const runSplit = latestOnly(async (current) => {
  try {
    const tp = intOf('split-tp');
    if (!Number.isFinite(tp)) throw new Error('tp: enter a number');
    const r = await api('/api/layer-split', { model: $('split-model').value, tp,
      dtype: $('split-dtype').value, link: $('split-link').value });
    if (!current()) return;
    split = r;
    showError('split-error', null);
    $('split-summary').textContent = `${r.model}: hidden ${r.hidden}, ${r.layers} layers, ` +
      `${r.heads} query heads, ${r.kv_heads} KV heads of ${r.head_dim}, FFN ${r.ffn}, vocabulary ` +
      `${r.vocab}${r.experts ? `, ${r.experts} experts` : ''}. TP sizes that split the heads: ` +
      `${r.valid_tp}.`;
    const sel = $('split-rank'), keep = sel.value;
    sel.replaceChildren();
    for (let i = 0; i < r.tp; ++i) sel.appendChild(el('option', { value: i }, String(i)));
    sel.value = keep !== '' && Number(keep) < r.tp ? keep : '0';
    const tbody = $('split-colls').tBodies[0];
    tbody.replaceChildren();
    for (const c of r.collectives) {
      const tr = el('tr');
      for (const [v, cls] of [[c.name, 'text'], [c.where, 'text'], [c.count], [c.bytes],
        [c.algorithm, 'text'], [c.bytes_sent]])
        tr.appendChild(el('td', cls ? { class: cls } : {}, String(v)));
      tbody.appendChild(tr);
    }
    if (!r.collectives.length) {
      const tr = el('tr');
      tr.appendChild(el('td', { colspan: 6, class: 'text' }, 'TP 1: no collectives'));
      tbody.appendChild(tr);
    }
    $('split-bytes').textContent = String(r.bytes_sent_per_token);
    $('split-out').hidden = false;
    drawSplit();
  } catch (e) {
    if (!current()) return;
    showError('split-error', e);
    $('split-out').hidden = true;
    split = null;
  }
});

// ---- start ----

function fill(select, values, selected) {
  for (const v of values) {
    const o = el('option', { value: v }, v);
    if (v === selected) o.selected = true;
    select.appendChild(o);
  }
}

async function start() {
  try {
    presets = await api('/api/presets');
  } catch (e) {
    showError('global-error', e);
    return;
  }
  const models = presets.models.map((m) => m.name);
  fill($('plan-model'), models, 'llama-2-7b');
  $('plan-model').appendChild(el('option', { value: '__config' }, 'paste a config.json...'));
  fill($('plan-gpu'), presets.devices.filter((d) => d !== 'cpu'), 'a100-80g');
  fill($('plan-link'), presets.links);
  fill($('plan-inter-node'), presets.links);
  fill($('split-model'), models, 'llama-2-7b');
  fill($('split-link'), presets.links, 'nvlink4');

  const planChanged = debounced(runPlan);
  for (const e of document.querySelectorAll('#plan-form input, #plan-form select, #plan-form textarea'))
    e.addEventListener(e.tagName === 'TEXTAREA' ? 'input' : 'change', planChanged);
  $('plan-run').addEventListener('click', () => runPlan());
  $('plan-model').addEventListener('change', () => {
    $('plan-config-label').hidden = $('plan-model').value !== '__config';
  });
  $('plan-mode').addEventListener('change', () => {
    const train = $('plan-mode').value === 'train';
    for (const e of document.querySelectorAll('.inf')) e.hidden = train;
    for (const e of document.querySelectorAll('.trn')) e.hidden = !train;
    $('plan-dtype').value = train ? 'bf16' : 'fp16';
  });
  const schedChanged = debounced(runSchedule);
  for (const id of ['sched-p', 'sched-m', 'sched-v', 'sched-schedule', 'sched-layers',
    'sched-forward', 'sched-backward'])
    $(id).addEventListener('change', schedChanged);
  $('sched-slider').addEventListener('input', drawSchedule);
  $('trace-file').addEventListener('change', (e) => {
    if (e.target.files.length) loadTrace(e.target.files[0]);
  });
  const splitChanged = debounced(runSplit);
  for (const id of ['split-model', 'split-tp', 'split-dtype', 'split-link'])
    $(id).addEventListener('change', splitChanged);
  $('split-rank').addEventListener('change', drawSplit);
  await Promise.all([runPlan(), runSchedule(), runSplit()]);
  document.body.dataset.ready = '1';
}

start();
