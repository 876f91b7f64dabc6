// The dashboard: polls GET /v1/stats every second and draws it (plain DOM and SVG, no library, no build step).
// The key, when the server has a keys file, lives in this tab's sessionStorage and goes out as a bearer header.
// Admin actions call the server's admin routes (pin, promote, unload) with the same key.
// Behind a cluster, /v1/stats lists slots, host entries and steps with the `replica` they are on, and `replicas`.
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "loraplex.key";
const SVG_NS = "http://www.w3.org/2000/svg";
// Adapter colours: readable on the light and the dark background alike.
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
                 "#9c755f", "#86bcb6", "#d37295", "#a0cbe8"];

const ui = {
  data: null,
  sort: { key: "tokens_per_s", dir: -1 },
  drawn: {},          // table id -> the JSON it was last drawn from (redraw only on change: keeps selects usable)
  promoteChoice: {},  // adapter name -> the version picked in its select
  colours: new Map(),
  lastOk: 0,
  timer: null,
};

const $ = (id) => document.getElementById(id);
const authMode = () => document.querySelector('meta[name="loraplex-auth"]').content;
const key = () => sessionStorage.getItem(KEY_STORE) || "";
const authHeaders = () => (key() ? { Authorization: "Bearer " + key() } : {});

// ---- formatting -----------------------------------------------------------------------------------
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}
function secs(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1e3).toFixed(s < 0.01 ? 2 : 0)} ms`;
  return `${s.toFixed(2)} s`;
}
function rate(x) { return x === 0 ? "0" : x < 10 ? x.toFixed(2) : x.toFixed(0); }
function count(x) { return x.toFixed(0); }
function shortSecs(s) { return s < 1 ? `${+(s * 1e3).toPrecision(3)}ms` : `${+s.toPrecision(3)}s`; }
function pct(x) { return x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)}%`; }
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return m ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(s)}s`;
}

// ---- DOM helpers ----------------------------------------------------------------------------------
function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (k in e) e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}
function svg(tag, attrs = {}, ...children) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "fill" || k === "stroke") e.style[k] = v;  // CSSOM, so var(--x) works under the page's CSP
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function title(text) { const t = document.createElementNS(SVG_NS, "title"); t.textContent = text; return t; }
function facts(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v, title: v })]));
}
function colour(name) {
  if (ui.data && name === ui.data.model.id) return "var(--base)";
  if (!ui.colours.has(name)) ui.colours.set(name, PALETTE[ui.colours.size % PALETTE.length]);
  return ui.colours.get(name);
}
function on(entry) { return entry.replica === undefined ? "" : ` on ${entry.replica}`; }
function dot(name) { const d = el("span", { class: "dot" }); d.style.background = colour(name); return d; }
function heads(...names) {
  return el("tr", {}, ...names.map((h) => el("th", { textContent: h, class: h === "adapter" || h === "replica" ? "l" : "" })));
}
function redrawn(id, value) {
  const sig = JSON.stringify(value);
  if (ui.drawn[id] === sig) return false;
  ui.drawn[id] = sig;
  return true;
}

// ---- polling and login ----------------------------------------------------------------------------
async function poll() {
  clearTimeout(ui.timer);
  try {
    // Relative URLs (as every URL of this page): behind a proxy's --root-path they stay under the prefix.
    const r = await fetch("v1/stats", { headers: authHeaders(), cache: "no-store" });
    if (r.status === 401) {
      const msg = (await r.json()).error?.message || "the key was refused";
      return showLogin(key() ? `Key refused: ${msg}` : "");
    }
    if (!r.ok) throw new Error(`/v1/stats answered ${r.status}`);
    const data = await r.json();
    ui.lastOk = Date.now();
    render(data);
  } catch (e) {
    $("live").textContent = `no answer: ${e.message}`;
    $("live").classList.add("stale");
  }
  ui.timer = setTimeout(poll, POLL_MS);
}

function showLogin(error) {
  sessionStorage.removeItem(KEY_STORE);
  $("main").hidden = true;
  $("logout").hidden = true;
  $("scope").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = error;
  $("live").textContent = "key needed";
  $("live").classList.add("stale");
  $("key").focus();
}

function login(ev) {
  ev.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key").value.trim());
  $("key").value = "";
  $("login").hidden = true;
  poll();
}

function tick() {
  if (!ui.lastOk) return;
  const age = (Date.now() - ui.lastOk) / 1000;
  $("live").textContent = age < 2 ? "live" : `updated ${age.toFixed(0)} s ago`;
  $("live").classList.toggle("stale", age >= 3);
}

// ---- admin actions (the existing admin routes) ----------------------------------------------------
async function admin(path, body, done) {
  try {
    const r = await fetch(path, { method: "POST", headers: { ...authHeaders(), "Content-Type": "application/json" },
                                  body: JSON.stringify(body) });
    const answer = await r.json();
    if (!r.ok) return toast(answer.error?.message || `${path} answered ${r.status}`, true);
    toast(done);
    poll();
  } catch (e) {
    toast(`${path}: ${e.message}`, true);
  }
}
function toast(text, bad = false) {
  const t = $("toast");
  t.textContent = text;
  t.classList.toggle("bad", bad);
  t.hidden = false;
  clearTimeout(t.timer);
  t.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

// ---- rendering ------------------------------------------------------------------------------------
function render(d) {
  ui.data = d;
  const admin = d.scope === "admin";
  document.body.classList.toggle("tenant-scope", !admin);
  $("main").hidden = false;
  $("login").hidden = true;
  $("logout").hidden = authMode() !== "key";
  $("scope").hidden = authMode() !== "key";
  $("scope").textContent = admin ? "admin" : "tenant view";
  $("model-id").textContent = `${d.model.id} · loraplex ${d.model.version}`;
  if (admin) for (const a of d.adapters.disk) colour(a.name);  // registration order fixes each adapter's colour
  renderModel(d.model);
  renderTenants(d.tenants);
  renderShares(d.fair_share.tenants);
  tick();
  if (!admin) return;
  renderBatch(d.batch, d.time, d.replicas || []);
  renderCache(d.adapters);
  renderSlots(d.adapters.slots);
  renderHost(d.adapters.host, d.adapters.loading);
  renderDisk(d.adapters.disk);
}

function renderModel(m) {
  const mem = m.memory;
  facts($("model-facts"), [
    ["model", m.id], ["dtype", m.dtype], ["device", m.device], ["quantization", m.quantization],
    ["context", `${m.max_model_len} tokens`],
    ["KV cache", `${mem.kv_blocks} blocks × ${mem.block_size} = ${mem.kv_tokens} tokens`],
    ...(m.replicas > 1 ? [["replicas", `${m.replicas} (memory per replica)`]] : []),
    ["adapter slots", m.replicas > 1 ? `${mem.adapter_slots} per replica` : `${mem.adapter_slots}`],
    ["prefix cache", !m.prefix_cache.enabled ? "off" : m.prefix_cache.hit_rate === undefined ? "on (your hits: table)"
      : `${pct(m.prefix_cache.hit_rate)} hit, ${m.prefix_cache.cached_blocks} blocks`],
    ["uptime", duration(m.uptime_s)], ["version", `loraplex ${m.version}`],
  ]);
  const parts = [["weights", mem.weights_bytes, "var(--weights)"], ["KV cache", mem.kv_cache_bytes, "var(--kv)"],
                 ["adapter slots", mem.adapter_slots_bytes, "var(--slots)"]];
  const total = parts.reduce((s, p) => s + p[1], 0) || 1;
  $("memory-bar").replaceChildren(...parts.map(([name, n, c]) => {
    const seg = el("div", { title: `${name}: ${bytes(n)}` });
    seg.style.width = `${(100 * n) / total}%`;
    seg.style.background = c;
    return seg;
  }));
  $("memory-legend").replaceChildren(...parts.map(([name, n, c]) => {
    const sw = el("i", { class: "sw" });
    sw.style.background = c;
    return el("span", {}, sw, `${name} ${bytes(n)}`);
  }), el("span", {}, `total ${bytes(total)}`));
}

function renderTenants(rows) {
  const table = $("tenants");
  for (const r of rows) r.error_count = Object.values(r.errors).reduce((s, n) => s + n, 0);
  const { key: k, dir } = ui.sort;
  const sorted = [...rows].sort((a, b) => {
    const x = a[k] ?? -Infinity, y = b[k] ?? -Infinity;
    return (typeof x === "string" ? x.localeCompare(y) : x - y) * dir || a.tenant.localeCompare(b.tenant);
  });
  for (const th of table.tHead.rows[0].cells) {
    th.classList.toggle("sorted", th.dataset.key === k);
    th.classList.toggle("asc", th.dataset.key === k && dir > 0);
  }
  const td = (text, cls = "") => el("td", { textContent: text, class: cls });
  table.tBodies[0].replaceChildren(...sorted.map((r) => {
    const errors = Object.entries(r.errors).map(([s, n]) => `${s}×${n}`).join(" ");
    const name = el("td", { class: "name", title: r.kind === "base" ? "the base model" : "adapter" }, dot(r.tenant), r.tenant);
    return el("tr", { "data-tenant": r.tenant }, name,
      td(rate(r.requests_per_s)), td(rate(r.tokens_per_s)), td(r.queued, r.queued ? "" : "dim"), td(r.running, r.running ? "" : "dim"),
      td(secs(r.ttft_p50_s)), td(secs(r.ttft_p99_s)), td(secs(r.tpot_p50_s)), td(secs(r.tpot_p99_s)),
      td(r.prompt_tokens_mean === null ? "–" : r.prompt_tokens_mean.toFixed(0)), td(pct(r.prefix_cache_hit_rate)),
      td(r.requests), td(errors || "–", errors ? "bad" : "dim"));
  }));
}

function renderShares(rows) {
  // Busiest first; a tenant key gets its own row only, without the shares (they count the others' traffic).
  const sorted = [...rows].sort((a, b) => b.window_tokens - a.window_tokens || a.tenant.localeCompare(b.tenant));
  const td = (text, cls = "") => el("td", { textContent: text, class: cls });
  $("shares").tBodies[0].replaceChildren(...sorted.map((r) => {
    const hits = Object.entries(r.throttled).map(([cap, n]) => `${cap}×${n}`).join(" ");
    return el("tr", { "data-tenant": r.tenant }, el("td", { class: "name", textContent: r.tenant }),
      td(r.weight), td(r.queued, r.queued ? "" : "dim"), td(r.running, r.running ? "" : "dim"),
      td(pct(r.share)), td(pct(r.weight_share)), td(r.output_tokens),
      td(hits || "–", hits ? "bad" : "dim"), td(r.last_limit || "–", r.last_limit ? "" : "dim"));
  }));
}

function sortBy(ev) {
  const th = ev.target.closest("th");
  if (!th) return;
  const k = th.dataset.key;
  ui.sort = { key: k, dir: ui.sort.key === k ? -ui.sort.dir : (th.dataset.type === "text" ? 1 : -1) };
  if (ui.data) renderTenants(ui.data.tenants);
}

// ---- charts (SVG) ---------------------------------------------------------------------------------
const W = 400;

function renderBatch(b, now, replicas) {
  const last = b.steps[b.steps.length - 1];
  facts($("batch-facts"), [
    ["queue", `${b.queue_depth}`], ["running", `${b.running}`],
    ["KV blocks", `${b.kv_blocks_used}/${b.kv_blocks_total}`],
    ["last step", last ? `${last.batch_size} seqs, ${secs(last.duration_s)}` + on(last) : "–"],
    ...replicas.map((r) => [`replica ${r.id}`, `${r.running} running, ${r.queue_depth} queued, ` +
      `KV ${r.kv_blocks_used}/${r.kv_blocks_total}, slots ${r.adapter_slots_used}/${r.adapter_slots}, ${rate(r.tokens_per_s)} tok/s`]),
  ]);
  const steps = b.steps.slice(-64), H = 150, mid = 96, top = 6, bottom = H - 6, n = 64, left = 30, bw = (W - left) / n;
  const sum = (s, part) => Object.values(s.tokens).reduce((a, t) => a + t[part], 0);
  const maxDecode = Math.max(1, ...steps.map((s) => sum(s, "decode")));
  const maxPrefill = Math.max(1, ...steps.map((s) => sum(s, "prefill")));
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "tokens per adapter per step" });
  g.append(svg("line", { x1: left, x2: W, y1: mid, y2: mid, class: "axis" }));
  g.append(svg("line", { x1: left, x2: W, y1: top, y2: top, class: "grid" }));
  g.append(svg("line", { x1: left, x2: W, y1: bottom, y2: bottom, class: "grid" }));
  for (const [v, y] of [[maxDecode, top + 8], [0, mid + 3], [maxPrefill, bottom]]) {
    g.append(svg("text", { x: 0, y }, document.createTextNode(count(v))));
  }
  const models = new Set();
  steps.forEach((s, i) => {
    const x = left + (n - steps.length + i) * bw;
    let up = mid, down = mid;
    for (const [m, t] of Object.entries(s.tokens).sort()) {
      models.add(m);
      const tip = `${m}: ${t.decode} decode, ${t.prefill} prefill tokens (step of ${s.batch_size} seqs, ${secs(s.duration_s)}${on(s)})`;
      if (t.decode) {
        const h = ((mid - top) * t.decode) / maxDecode;
        up -= h;
        g.append(svg("rect", { x: x + 0.5, y: up, width: bw - 1, height: h, fill: colour(m) }, title(tip)));
      }
      if (t.prefill) {
        const h = ((bottom - mid) * t.prefill) / maxPrefill;
        g.append(svg("rect", { x: x + 0.5, y: down, width: bw - 1, height: h, fill: colour(m), opacity: 0.55 }, title(tip)));
        down += h;
      }
    }
  });
  if (!steps.length) g.append(svg("text", { x: W / 2 - 40, y: mid - 6 }, document.createTextNode("no steps yet")));
  $("batch-chart").replaceChildren(g);
  $("batch-legend").replaceChildren(el("span", {}, "↑ decode, ↓ prefill tokens:"),
                                    ...[...models].sort().map((m) => el("span", {}, dot(m), m)));
  renderThroughput(b.throughput, now);
  renderQueue(steps);
}

function nice(x) {  // the smallest 1, 2 or 5 x 10^k at or above x: round axis ends
  const p = 10 ** Math.floor(Math.log10(x));
  return [1, 2, 5, 10].map((m) => m * p).find((v) => v >= x);
}

function lineChart(series, H, xLabels, fmt = rate) {
  // series: [{values: [y...] (same length), colour, name}]; xLabels: [left end, right end]
  const max = nice(Math.max(1, ...series.flatMap((s) => s.values)));
  const len = Math.max(2, series[0].values.length), left = 30, right = W - 2, top = 6, bottom = H - 14;
  const x = (i) => left + ((right - left) * i) / (len - 1), y = (v) => bottom - ((bottom - top) * v) / max;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  for (const f of [0, 0.5, 1].filter((f) => fmt !== count || Number.isInteger(max * f))) {
    g.append(svg("line", { x1: left, x2: right, y1: y(max * f), y2: y(max * f), class: "grid" }));
    g.append(svg("text", { x: 0, y: y(max * f) + 3 }, document.createTextNode(fmt(max * f))));
  }
  g.append(svg("text", { x: left, y: H - 2 }, document.createTextNode(xLabels[0])));
  g.append(svg("text", { x: right - 22, y: H - 2 }, document.createTextNode(xLabels[1])));
  for (const s of series) {
    const pts = s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    g.append(svg("polyline", { points: pts, fill: "none", stroke: s.colour, "stroke-width": 1.6 }, title(s.name)));
  }
  return g;
}

function renderThroughput(points, now) {
  const end = Math.floor(now), span = 120, decode = new Array(span).fill(0), prefill = new Array(span).fill(0);
  for (const p of points) {
    const i = span - 1 - (end - p.t);
    if (i >= 0 && i < span) { decode[i] = p.decode_tokens; prefill[i] = p.prefill_tokens; }
  }
  $("throughput-chart").replaceChildren(lineChart([
    { values: prefill, colour: "var(--prefill)", name: "prefill tokens/s" },
    { values: decode, colour: "var(--decode)", name: "decode tokens/s" },
  ], 120, ["-2 min", "now"]));
}

function renderQueue(steps) {
  const values = (f) => (steps.length ? steps.map(f) : [0, 0]);
  $("queue-chart").replaceChildren(lineChart([
    { values: values((s) => s.kv_blocks_used), colour: "var(--kv)", name: "KV blocks used" },
    { values: values((s) => s.queue_depth), colour: "var(--warn)", name: "queue depth" },
  ], 70, [`-${steps.length} steps`, "now"], count));
}

function renderCache(a) {
  const row = (name, f) => el("tr", {}, el("td", { textContent: name }), ...["host", "device"].map((t) => el("td", { textContent: f(t) })));
  const hitRate = (t) => { const h = a.hits[t] || 0, m = a.misses[t] || 0; return h + m ? pct(h / (h + m)) : "–"; };
  $("cache-counters").replaceChildren(
    heads("", "host", "device"),
    row("loads", (t) => a.loads[t] || 0), row("hits", (t) => a.hits[t] || 0), row("misses", (t) => a.misses[t] || 0),
    row("hit rate", hitRate), row("evictions", (t) => a.evictions[t] || 0),
    row("mean load", (t) => (a.load_seconds[t].count ? secs(a.load_seconds[t].sum / a.load_seconds[t].count) : "–")),
    el("tr", {}, el("td", { textContent: "load failures" }), el("td", { textContent: a.load_failures, colSpan: 2, class: a.load_failures ? "bad" : "" })),
  );
  // Histogram: one group per latency bucket, host and device side by side.
  const buckets = a.load_seconds.host.buckets, n = buckets.length + 1, H = 80, bottom = H - 14, top = 4, gw = W / n;
  const max = Math.max(1, ...["host", "device"].flatMap((t) => a.load_seconds[t].counts));
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "adapter load time histogram" });
  g.append(svg("line", { x1: 0, x2: W, y1: bottom, y2: bottom, class: "axis" }));
  for (let i = 0; i < n; i++) {
    const label = i < buckets.length ? `≤${shortSecs(buckets[i])}` : `>${shortSecs(buckets[buckets.length - 1])}`;
    ["host", "device"].forEach((t, j) => {
      const c = a.load_seconds[t].counts[i], h = ((bottom - top) * c) / max;
      if (c) g.append(svg("rect", { x: i * gw + 2 + j * (gw / 2 - 2), y: bottom - h, width: gw / 2 - 2, height: h, fill: `var(--${t})` },
                          title(`${t}: ${c} loads ${label}`)));
    });
    if (i % 2 === 0) g.append(svg("text", { x: i * gw + 1, y: H - 3 }, document.createTextNode(label)));
  }
  $("load-chart").replaceChildren(g);
}

// A cluster's entries carry the replica they are on: a first column then names it.
function replicaCell(entry) { return entry.replica === undefined ? null : el("td", { textContent: entry.replica, class: "replica l" }); }
function withReplica(entries, ...names) { return entries.some((e) => e.replica !== undefined) ? ["replica", ...names] : names; }

function renderSlots(slots) {
  if (!redrawn("slots", slots)) return;
  const head = heads(...withReplica(slots, "slot", "adapter", "version", "rank", "refs", "pinned"));
  $("slots").replaceChildren(head, ...slots.map((s) => s.name === null
    ? el("tr", {}, replicaCell(s), el("td", { textContent: s.slot }), el("td", { textContent: "empty", class: "dim l", colSpan: 5 }))
    : el("tr", { "data-adapter": s.name }, replicaCell(s), el("td", { textContent: s.slot }), el("td", { class: "name" }, dot(s.name), s.name),
         el("td", { textContent: s.version, class: "version" }), el("td", { textContent: s.rank ?? "–" }),
         el("td", { textContent: s.refcount, class: s.refcount ? "" : "dim" }),
         el("td", { textContent: s.pinned ? "📌" : "", class: "pin" }))));
}

function renderHost(host, loading) {
  $("host-summary").textContent = `${host.entries.length} of ${host.capacity} held` +
    (loading.length ? ` · loading from disk: ${loading.join(", ")}` : "");
  if (!redrawn("host", host)) return;
  const head = heads(...withReplica(host.entries, "adapter", "version", "rank", "requests", "pinned"));
  $("host").replaceChildren(head, ...host.entries.map((e) => el("tr", { "data-adapter": e.name }, replicaCell(e),
    el("td", { class: "name" }, dot(e.name), e.name), el("td", { textContent: e.version, class: "version" }),
    el("td", { textContent: e.rank ?? "–" }), el("td", { textContent: e.refcount, class: e.refcount ? "" : "dim" }),
    el("td", { textContent: e.pinned ? "📌" : "", class: "pin" }))));
}

function renderDisk(disk) {
  if (!redrawn("disk", disk)) return;
  const head = heads("adapter", "current", "versions", "");
  $("disk").replaceChildren(head, ...disk.map((a) => {
    const choice = a.versions.includes(ui.promoteChoice[a.name]) ? ui.promoteChoice[a.name] : a.current;
    const select = el("select", { "aria-label": `version of ${a.name} to promote`, class: "promote-version",
                                  on: { change: (e) => { ui.promoteChoice[a.name] = e.target.value; promote.disabled = e.target.value === a.current; } } },
      ...a.versions.map((v) => el("option", { value: v, textContent: v, selected: v === choice })));
    const promote = el("button", { type: "button", class: "promote", textContent: "Promote", disabled: choice === a.current,
      on: { click: () => admin("v1/promote_lora_adapter", { lora_name: a.name, version: select.value },
                               `${a.name}: version ${select.value} promoted`) } });
    const pin = el("button", { type: "button", class: "pin-toggle", textContent: a.pinned ? "Unpin" : "Pin",
      title: a.pinned ? "let it leave its device slot" : "keep it in a device slot",
      on: { click: () => admin("v1/pin_lora_adapter", { lora_name: a.name, pinned: !a.pinned },
                               `${a.name} ${a.pinned ? "unpinned" : "pinned"}`) } });
    const unload = el("button", { type: "button", class: "danger", textContent: "Unload",
      on: { click: () => confirm(`Unload adapter ${a.name}? New requests for it will get 404.`) &&
                         admin("v1/unload_lora_adapter", { lora_name: a.name }, `${a.name} unloaded`) } });
    return el("tr", { "data-adapter": a.name }, el("td", { class: "name" }, dot(a.name), a.name, a.pinned ? el("span", { class: "pin", textContent: " 📌" }) : null),
      el("td", { textContent: a.current, class: "current" }), el("td", {}, select),
      el("td", {}, el("div", { class: "actions" }, promote, pin, unload)));
  }));
}

// ---- start ----------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", login);
  $("logout").addEventListener("click", () => showLogin(""));
  $("tenants").tHead.addEventListener("click", sortBy);
  setInterval(tick, 500);
  if (authMode() === "key" && !key()) showLogin("");
  else poll();
});
