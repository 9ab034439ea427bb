// Chiffon fleet dashboard: vanilla JS, no build step. Polls the REST API under /api/v1.
"use strict";

const API = "/api/v1";
// ?refresh_ms= shortens polling (the browser tests use it); default every 5 s.
const REFRESH_MS = Number(new URLSearchParams(location.search).get("refresh_ms")) || 5000;
// After this many missed refreshes the data on screen is called stale.
const STALE_AFTER_REFRESHES = 3;
const WINDOWS = [["15m", 900], ["1h", 3600], ["6h", 21600], ["24h", 86400], ["7d", 604800]];

const state = {
  agents: [], summary: null, fetchedAt: 0, lastOkAt: 0, error: null,
  sort: { key: "name", dir: 1 }, windowSeconds: 3600, charts: {},
  log: { jobId: null, attempt: null, offset: 0, text: "" },
};
// The job page keeps at most this much of a job's output on screen (its tail).
const LOG_KEEP_CHARS = 64 * 1024;
// The states' groupings come from the orchestrator (/dispatch.js: the dispatch contract).
const ACTIVE = DISPATCH.active;

const TOKEN_KEY = "chiffon.token";

// `chiffon up` prints the dashboard's address with the API token in the fragment (#token=),
// which the browser never sends to a server. Keep it for this tab and take it out of the
// address bar and the history at once.
(function takeTokenFromFragment() {
  const match = location.hash.match(/^#token=([^&]+)/);
  if (!match) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search + "#/");
})();

// Every request goes through here: the token travels as a bearer Authorization header, and
// a 401 asks the user for it.
async function api(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(API + path, { headers, cache: "no-store" });
  if (response.status === 401) {
    // A refusal of a token already replaced (a request sent before the user gave a new
    // one, answered after) says nothing about the new one: no login form for it.
    if (token === sessionStorage.getItem(TOKEN_KEY)) {
      showLogin(token ? "That API token was refused." : NEEDS_TOKEN);
    }
    const error = new Error(token ? "the API token was refused" : "an API token is needed");
    error.auth = true;  // the orchestrator answered: it is not unreachable
    throw error;
  }
  if (!response.ok) throw new Error(`HTTP ${response.status} on ${path}`);
  return response.json();
}

const NEEDS_TOKEN = "This orchestrator needs its API token: open the address `chiffon up` printed "
  + "(it carries the token after #token=), or paste the token here: the orchestrator's "
  + "CHIFFON_API_TOKEN, or the contents of ~/.chiffon/api_token.";

function showLogin(message) {
  const form = document.getElementById("login");
  if (!form.hidden) return;
  document.getElementById("login-msg").textContent = message;
  form.hidden = false;
  document.getElementById("login-token").focus();
}

function setupLogin() {
  const form = document.getElementById("login");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("login-token");
    const token = input.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    input.value = "";
    form.hidden = true;
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  });
}

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "href" || k === "title") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

const fmt = (x, digits = 1) => (x === null || x === undefined ? "?" : Number(x).toFixed(digits));
// "1 job", "2 jobs"; a whole number bare, a fraction to one decimal ("1.5 cores").
const plural = (n, word) => `${Number.isInteger(n) ? n : fmt(n)} ${word}${n === 1 ? "" : "s"}`;

// An argv as a shell would need it typed, as Python's shlex.join writes it: a word of only
// safe characters stays bare, any other is single-quoted (a ' inside written '"'"').
const SHELL_SAFE = /^[\w@%+=:,./-]+$/;
const shellQuote = (word) => (SHELL_SAFE.test(word) ? word : `'${word.replaceAll("'", `'"'"'`)}'`);
const shellJoin = (argv) => argv.map(shellQuote).join(" ");

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

// Seconds since the agent was last heard, counting the time since our last fetch.
function ageNow(agent) {
  if (agent.age_seconds === null) return null;
  return agent.age_seconds + (Date.now() - state.fetchedAt) / 1000;
}

// ---- connection status -------------------------------------------------------------

// What is on screen while requests fail: the last good data, or none at all yet.
function dataOnScreen(lastOk) {
  if (lastOk) return `showing data from ${lastOk}`;
  return state.authError ? "no data loaded yet: enter the token below" : "no data could be loaded yet";
}

function showConnection() {
  const conn = $("#conn");
  const since = state.lastOkAt ? (Date.now() - state.lastOkAt) / 1000 : null;
  const lastOk = state.lastOkAt ? new Date(state.lastOkAt).toLocaleTimeString() : null;
  document.body.dataset.conn = state.error ? "down" : "up";
  if (state.error && state.authError) {
    conn.dataset.state = "down";
    conn.textContent = `Orchestrator reachable, but ${state.error}; ${dataOnScreen(lastOk)}`;
  } else if (state.error) {
    conn.dataset.state = "down";
    conn.textContent = `Orchestrator unreachable (${state.error}); ${dataOnScreen(lastOk)}`;
  } else if (since === null) {
    conn.dataset.state = "loading";
    conn.textContent = "connecting…";
  } else if (state.summary && state.summary.registry_stale_seconds !== null && state.summary.registry_stale_seconds !== undefined) {
    conn.dataset.state = "stale";
    conn.textContent = `Registry stale: the orchestrator has not updated agent statuses for ${Math.round(state.summary.registry_stale_seconds)} s`;
  } else if (since * 1000 > STALE_AFTER_REFRESHES * REFRESH_MS) {
    conn.dataset.state = "stale";
    conn.textContent = `Stale: no update for ${Math.round(since)} s (last ${lastOk})`;
  } else {
    conn.dataset.state = "live";
    conn.textContent = `Live · updated ${Math.round(since)} s ago`;
  }
}

async function poll(load) {
  try {
    await load();
    state.error = null;
    state.lastOkAt = Date.now();
  } catch (err) {
    state.error = err instanceof TypeError ? "network error" : err.message;
    state.authError = Boolean(err.auth);
  }
  showConnection();
  if (state.error) renderTable();  // statuses on screen become "last known"
}

// ---- fleet view ----------------------------------------------------------------------

async function loadFleet() {
  const [summary, agents, capacity] = await Promise.all([
    api("/fleet/summary"), api("/agents"), api("/agents/available-capacity?agent_type=any"),
  ]);
  state.summary = summary;
  state.agents = agents;
  // Free cores, memory and VRAM net of what running jobs hold (online agents).
  state.net = Object.fromEntries(capacity.map((c) => [c.agent_id, c]));
  state.fetchedAt = Date.now();
  renderFleet();
}

function card(key, label, value, detail = "") {
  return el("div", { class: "card", "data-k": key },
    el("div", { class: "k" }, label), el("div", { class: "v" }, value, detail ? el("small", {}, detail) : ""));
}

function renderSummary(summary) {
  const f = summary.fleet;
  $("#summary").replaceChildren(
    card("online", "Online", f.agents_online),
    card("offline", "Offline", f.agents_offline),
    card("vram", "Free VRAM", `${fmt(f.gpu_vram_available_gb)} GB`, ` / ${fmt(f.gpu_vram_total_gb)}`),
    card("cores", "Free cores", f.cpu_cores_available, ` / ${f.cpu_cores_physical}`),
    card("gpus", "GPUs online", f.gpu_count),
  );
  const head = el("tr", {}, ...["Pool", "Online", "Offline", "Free / total VRAM (GB)", "Free / total cores"].map((h) => el("th", {}, h)));
  const rows = summary.pools.map((p) => el("tr", { "data-pool": p.pool_name },
    el("td", { class: "name" }, el("bdi", {}, p.pool_name)), el("td", { class: "num" }, p.agents_online), el("td", { class: "num" }, p.agents_offline),
    el("td", { class: "num" }, `${fmt(p.gpu_vram_available_gb)} / ${fmt(p.gpu_vram_total_gb)}`),
    el("td", { class: "num" }, `${p.cpu_cores_available} / ${p.cpu_cores_physical}`)));
  $("#pools").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  const select = $("#f-pool");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "all"), ...summary.pools.map((p) => el("option", { value: p.pool_name }, p.pool_name)));
  select.value = chosen;
}

const metrics = (agent) => agent.resource_metrics || {};

// Why no new job lands on a desktop or a GPU (the agent's `withheld`; docs/owner.md).
const WITHHELD = {
  never: "takes no jobs", root: "takes no jobs (agent runs as root)", unsandboxed: "takes no jobs (sandbox required, not full)", outside_schedule: "outside the owner's schedule",
  owner_active: "owner active", owner_unknown: "owner's idle time unknown", reserved: "reserved by the owner",
  unhealthy: "unhealthy", exclusive_app: "owner's exclusive app", dirty: "dirty: memory not back yet",
};
const withheldText = (reason) => WITHHELD[reason] ?? reason;

// An admin's hold outranks the owner's policy (docs/security.md): no new job lands there.
const HOLD = { pending: "pending: waiting for an admin to approve it", suspect: "suspect: quarantined" };
const holdText = (agent) => HOLD[agent.hold] ?? agent.hold;

// The owner's side of a desktop: active, idle for N min, outside the schedule.
function ownerText(agent) {
  const m = metrics(agent);
  if (agent.hold) return holdText(agent);
  if (m.jobs_withheld) return withheldText(m.jobs_withheld);
  if (!agent.accepts_jobs) return "takes no jobs";
  const idle = m.owner_idle_seconds;
  if (idle === null || idle === undefined) return "takes jobs";
  return idle >= 60 ? `owner idle ${Math.round(idle / 60)} min` : "owner active";
}

// The orders the agent refused since it started, by reason (docs/security.md).
function refusedText(counts) {
  const seen = Object.entries(counts || {}).filter(([, n]) => n > 0);
  return seen.length ? seen.map(([reason, n]) => `${reason} ${n}`).join(", ") : "none";
}

// The desktop's job sandbox (its heartbeat's `sandbox`; docs/protocol.md): what it enforces
// in a word (cgroup+mem+home+dev), what keeps it from being full, and the agent's why lines.
// Full (what `chiffon run --require-sandbox` asks): processes contained, memory capped, home hidden.
const CONTAINED = ["cgroup", "pidns"];
function sandboxGaps(s) {
  if (!s) return ["not reported"];
  return [
    CONTAINED.includes(s.processes) ? "" : "processes not contained",
    s.memory_limit ? "" : "no memory limit",
    s.home_hidden ? "" : "home not hidden",
  ].filter(Boolean);
}
function sandboxText(s) {
  if (!s) return "not reported";
  const words = [CONTAINED.includes(s.processes) ? s.processes : "", s.memory_limit ? "mem" : "",
    s.home_hidden ? "home" : "", s.devices_hidden ? "dev" : ""].filter(Boolean);
  const gaps = sandboxGaps(s);
  const required = s.required ? "; required by its owner" : "";
  return `${words.join("+") || "none"}${gaps.length ? ` (${gaps.join(", ")})` : " (full)"}${required}`;
}
function sandboxFact(s) {
  const node = card("sandbox", "Sandbox", sandboxText(s));
  const why = ((s && s.why) || []).filter(Boolean);
  if (why.length) node.append(el("ul", { class: "why" }, ...why.map((line) => el("li", {}, el("bdi", {}, line)))));
  return node;
}

function foreignText(g) {
  if (g.foreign_processes === null || g.foreign_processes === undefined) return "unknown";
  if (!g.foreign_processes) return "none";
  const names = g.foreign_names && g.foreign_names.length ? ` (${g.foreign_names.join(", ")})` : "";
  return `${g.foreign_processes}${names}, ${fmt(g.foreign_vram_gb)} GB`;
}
// A free number as a new job could have it: net of claims where the capacity answer has the
// agent (online), else what the agent last reported.
const free = (agent, field) => state.net?.[agent.agent_id]?.[field] ?? metrics(agent)[field];
const held = (agent) => state.net?.[agent.agent_id]?.claims;

const SORT_KEYS = {
  name: (a) => a.name.toLowerCase(),
  pool: (a) => a.pool_name,
  status: (a) => a.status,
  age: (a) => ageNow(a) ?? Infinity,
  cores: (a) => free(a, "cpu_cores_available") ?? -1,
  memory: (a) => free(a, "memory_available_gb") ?? -1,
  vram: (a) => free(a, "gpu_vram_available_gb") ?? -1,
};

// The capacity query's minimums, client side (`chiffon capacity`'s options): a number an
// agent did not report never matches a minimum on it.
const MINIMUMS = [
  ["#f-vram", "gpu_vram_available_gb"],
  ["#f-gpu", "gpu_vram_available_max_gb"],
  ["#f-cores", "cpu_cores_available"],
  ["#f-mem", "memory_available_gb"],
];

function matches(agent) {
  const pool = $("#f-pool").value;
  const status = $("#f-status").value;
  if (pool && agent.pool_name !== pool) return false;
  if (status && agent.status !== status) return false;
  for (const [input, field] of MINIMUMS) {
    const minimum = parseFloat($(input).value);
    if (Number.isNaN(minimum) || minimum <= 0) continue;
    const have = free(agent, field);
    if (have === null || have === undefined || have < minimum) return false;
  }
  // `--max-gpu-temp`: the hottest GPU that reported one at most this warm (the registry's
  // gpu_temperature_max_c); an agent none of whose GPUs said never matches.
  const maximum = parseFloat($("#f-temp").value);
  if (!Number.isNaN(maximum)) {
    const known = (metrics(agent).gpus || []).map((g) => g.temperature_c).filter((t) => t !== null && t !== undefined);
    if (!known.length || Math.max(...known) > maximum) return false;
  }
  return true;
}

function gpuBars(agent) {
  const gpus = metrics(agent).gpus || [];
  if (!gpus.length) return el("span", { class: "muted" }, "no GPU");
  return el("div", { class: "gpus" }, ...gpus.map((g) => {
    const share = g.vram_total_gb ? Math.max(0, Math.min(1, (g.vram_free_gb ?? 0) / g.vram_total_gb)) : 0;
    const fill = el("span");
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    // why no new job lands there, on a line of its own under the bar (bars stay aligned)
    const withheld = g.withheld ? el("div", { class: "withheld", "data-withheld": g.withheld }, withheldText(g.withheld)) : "";
    return el("div", { class: "gpu-line" },
      el("div", { class: "gpu", title: g.name || `GPU ${g.index}`, "data-gpu": g.index },
        el("span", {}, `#${g.index}`), el("div", { class: "bar" }, fill),
        el("span", { class: "label" }, `${fmt(g.vram_free_gb)} / ${fmt(g.vram_total_gb)} GB`)),
      withheld);
  }));
}

// While the orchestrator cannot be asked, a status on screen is only the last one known:
// grey, and saying so, never a green "online" that may no longer be true.
function statusBadge(status) {
  if (!state.error) return el("span", { class: `badge ${status}` }, status);
  return el("span", { class: "badge unknown", title: "the orchestrator cannot be reached" }, `${status}?`);
}

// What the jobs on a desktop hold, naming only what they reserved: "1 job holds 4.0 GB
// VRAM, 2 cores", "2 jobs running, hold nothing reserved" (no VRAM on a desktop without GPU).
function heldText(claims) {
  const parts = [];
  if (claims.vram_gb > 0) parts.push(`${fmt(claims.vram_gb)} GB VRAM`);
  if (claims.cpu_cores > 0) parts.push(plural(claims.cpu_cores, "core"));
  if (claims.memory_gb > 0) parts.push(`${fmt(claims.memory_gb)} GB memory`);
  const verb = claims.jobs === 1 ? "holds" : "hold";
  if (!parts.length) return `${plural(claims.jobs, "job")} running, ${verb} nothing reserved`;
  return `${plural(claims.jobs, "job")} ${verb} ${parts.join(", ")}`;
}

function agentRow(agent) {
  const m = metrics(agent);
  const claims = held(agent);
  const jobs = claims && claims.jobs ? el("div", { class: "muted held", "data-jobs": claims.jobs }, heldText(claims)) : "";
  return el("tr", { class: agent.status, "data-agent-id": agent.agent_id, "data-status": agent.status },
    el("td", { class: "name" }, el("a", { href: `#/agents/${agent.agent_id}` }, el("bdi", {}, agent.name))),
    el("td", { class: "name" }, el("bdi", {}, agent.pool_name)),
    el("td", {}, statusBadge(agent.status), el("div", { class: agent.hold ? "owner held-by-admin" : "muted owner", "data-owner": "", "data-hold": agent.hold ?? "" }, ownerText(agent))),
    el("td", { class: "num age" }, ago(ageNow(agent))),
    el("td", { class: "num" }, `${free(agent, "cpu_cores_available") ?? "?"} / ${m.cpu_cores_physical ?? "?"}`),
    el("td", { class: "num" }, `${fmt(free(agent, "memory_available_gb"))} / ${fmt(m.memory_total_gb)} GB`),
    el("td", {}, gpuBars(agent), jobs));
}

function renderTable() {
  const { key, dir } = state.sort;
  const value = SORT_KEYS[key];
  const shown = state.agents.filter(matches).sort((a, b) => {
    const x = value(a), y = value(b);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || a.name.localeCompare(b.name);
  });
  $("#agents tbody").replaceChildren(...shown.map(agentRow));
  $("#shown").textContent = `${shown.length} of ${state.agents.length} agents`;
  for (const th of document.querySelectorAll("#agents th[data-sort]")) {
    th.setAttribute("aria-sort", th.dataset.sort === key ? (dir > 0 ? "ascending" : "descending") : "none");
  }
}

function renderFleet() {
  if (state.summary) renderSummary(state.summary);
  renderTable();
}

// ---- agent view ----------------------------------------------------------------------

function renderWindows(agentId) {
  $("#windows").replaceChildren(...WINDOWS.map(([label, seconds]) => {
    const button = el("button", { type: "button", "aria-pressed": String(seconds === state.windowSeconds) }, label);
    button.addEventListener("click", () => { state.windowSeconds = seconds; renderWindows(agentId); refresh(); });
    return button;
  }));
}

function fact(key, label, value) { return card(key, label, value); }

function renderAgent(agent) {
  const m = metrics(agent);
  // <bdi>: an agent's name cannot reorder the text around it (a right-to-left override)
  $("#agent-title").replaceChildren(el("bdi", { class: "name" }, agent.name), " ", el("span", { class: `badge ${agent.status}`, "data-status": agent.status }, agent.status));
  state.fetchedAt = Date.now();
  const labels = Object.entries(agent.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  $("#agent-facts").replaceChildren(
    fact("pool", "Pool", agent.pool_name),
    fact("seen", "Last seen", ago(agent.age_seconds)),
    fact("cores", "Free cores", `${m.cpu_cores_available ?? "?"} / ${m.cpu_cores_physical ?? "?"}`),
    fact("memory", "Free memory", `${fmt(m.memory_available_gb)} / ${fmt(m.memory_total_gb)} GB`),
    fact("vram", "Free VRAM", `${fmt(m.gpu_vram_available_gb)} / ${fmt(m.gpu_vram_total_gb)} GB`),
    fact("id", "Agent id", agent.agent_id),
    fact("version", "Version", agent.agent_version ?? "?"),
    fact("labels", "Labels", labels || "none"),
    fact("owner", "Owner", ownerText(agent)),
    fact("reliability", "Last 7 days", `${agent.reliability?.offline_events_7d ?? 0} offline, ${agent.reliability?.preemptions_7d ?? 0} taken back`),
    fact("refused", "Orders refused", refusedText(m.orders_refused)),
    fact("hold", "Hold", agent.hold ? `${holdText(agent)} (${agent.hold_reason ?? ""})` : "none"),
    sandboxFact(agent.sandbox ?? m.sandbox),
  );
  renderGpus(m, {});
}

// Each GPU the agent reported (model, UUID, memory, load, other programs on it, whether it
// takes jobs and the job it runs) and what its probes could not read.
function renderGpus(m, jobsOn) {
  const gpus = m.gpus || [];
  const head = el("tr", {}, ...["GPU", "Model", "UUID", "Free / total VRAM", "Utilization", "Temperature", "Other programs", "New jobs", "Running"].map((h) => el("th", {}, h)));
  const rows = gpus.map((g) => el("tr", { "data-gpu": g.index },
    el("td", { class: "num" }, `#${g.index}`), el("td", { class: "name" }, el("bdi", {}, g.name ?? "?")),
    el("td", { class: "name muted" }, g.uuid ?? "?"),
    el("td", { class: "num" }, `${fmt(g.vram_free_gb)} / ${fmt(g.vram_total_gb)} GB`),
    el("td", { class: "num" }, g.utilization_percent === null || g.utilization_percent === undefined ? "?" : `${fmt(g.utilization_percent, 0)} %`),
    el("td", { class: "num" }, g.temperature_c === null || g.temperature_c === undefined ? "?" : `${fmt(g.temperature_c, 0)} °C`),
    el("td", { "data-foreign": "" }, foreignText(g)),
    el("td", { "data-withheld": g.withheld ?? "" }, g.withheld ? withheldText(g.withheld) + (g.fault ? `: ${g.fault}` : "") : "welcome"),
    el("td", {}, ...(jobsOn[g.uuid ?? `index-${g.index}`] || []).map(jobLink))));
  $("#agent-gpus").replaceChildren(
    el("thead", {}, head),
    el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 9, class: "muted" }, "no GPU on this machine"))])),
  );
  const errors = Object.entries(m.probe_errors || {});
  $("#agent-errors").hidden = !errors.length;
  $("#agent-errors").replaceChildren(el("h2", {}, "What the agent could not read"),
    ...errors.map(([probe, error]) => el("p", { "data-probe": probe }, el("b", {}, `${probe}: `), el("bdi", {}, error))));
}

const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

function gpuIndexes(points) {
  const seen = new Set();
  for (const p of points) for (const g of p.gpus) seen.add(g.index);
  return [...seen].sort((a, b) => a - b);
}

function perGpu(points, indexes, field) {
  return indexes.map((i) => points.map((p) => {
    const gpu = p.gpus.find((g) => g.index === i);
    return gpu ? gpu[field] : null;
  }));
}

// Where the agent was not heard (offline), a null point, so the line breaks instead of
// joining the two sides: a gap is a step longer than three times the usual one.
function withGaps(points, stepSeconds) {
  const times = points.map((p) => Date.parse(p.at) / 1000);
  const diffs = times.slice(1).map((t, i) => t - times[i]).sort((a, b) => a - b);
  const usual = Math.max(stepSeconds, diffs.length ? diffs[Math.floor(diffs.length / 2)] : 0);
  const out = [];
  points.forEach((p, i) => {
    if (i && times[i] - times[i - 1] > 3 * usual) out.push({ at: new Date((times[i - 1] + usual) * 1000).toISOString(), gpus: [], gap: true });
    out.push(p);
  });
  return out;
}

// [label, x values, [series label, values]...] for each chart.
function chartData(points) {
  const xs = points.map((p) => Date.parse(p.at) / 1000);
  const gpus = gpuIndexes(points);
  const gpuSeries = (field) => perGpu(points, gpus, field).map((values, n) => [`GPU ${gpus[n]}`, values]);
  return {
    load: [xs, [["load 1 min", points.map((p) => p.cpu_load_1min ?? null)], ["physical cores", points.map((p) => p.cpu_cores_physical ?? null)]]],
    memory: [xs, [["free memory GB", points.map((p) => p.memory_available_gb ?? null)]]],
    vram: [xs, gpuSeries("vram_free_gb")],
    util: [xs, gpuSeries("utilization_percent")],
  };
}

function drawChart(name, xs, series, span, empty) {
  const box = $(`#chart-${name}`);
  box.dataset.points = String(xs.length);
  box.dataset.series = String(series.length);
  const known = series.some(([, values]) => values.some((v) => v !== null && v !== undefined));
  const old = state.charts[name];
  if (!xs.length || !known) {
    if (old) { old.destroy(); delete state.charts[name]; }
    box.replaceChildren(el("div", { class: "empty" }, xs.length ? empty : "no history in this window yet"));
    return;
  }
  const data = [xs, ...series.map(([, values]) => values)];
  if (old && old.series.length === data.length && old.windowKey === span.join()) { old.setData(data); return; }
  if (old) old.destroy();
  box.replaceChildren();
  const opts = {
    width: Math.max(300, box.clientWidth), height: 200,
    series: [{}, ...series.map(([label], n) => ({ label, stroke: PALETTE[n % PALETTE.length], width: 2, spanGaps: false }))],
    // The x axis is the window asked for, whatever the points: one point no longer
    // stretches it over years, and each window button shows its own span.
    // `space`: at least 90 px between time labels, so a day's do not run together.
    axes: [{ space: 90 }, { size: 50 }],
    scales: {
      x: { time: true, range: () => span },
      y: { range: (u, min, max) => [Math.min(0, min ?? 0), Math.max(1, (max ?? 1) * 1.1)] },
    },
  };
  const chart = new uPlot(opts, data, box);
  chart.windowKey = span.join();
  state.charts[name] = chart;
}

function destroyCharts() {
  for (const chart of Object.values(state.charts)) chart.destroy();
  state.charts = {};
}

async function loadAgent(agentId) {
  const since = new Date(Date.now() - state.windowSeconds * 1000).toISOString();
  const [agent, history, events] = await Promise.all([
    api(`/agents/${agentId}`),
    api(`/agents/${agentId}/metrics?since=${encodeURIComponent(since)}`),
    api(`/agents/${agentId}/events?limit=50`),
  ]);
  renderAgent(agent);
  const span = [Date.parse(history.since) / 1000, Date.parse(history.until) / 1000];
  const gpuless = !(metrics(agent).gpus || []).length;
  const points = withGaps(history.points, history.step_seconds);
  for (const [name, [xs, series]] of Object.entries(chartData(points))) {
    const empty = gpuless && (name === "vram" || name === "util") ? "no GPU on this machine" : "not reported by this agent";
    drawChart(name, xs, series, span, empty);
  }
  $("#events tbody").replaceChildren(...events.map((e) => el("tr", { "data-to": e.to_status },
    el("td", {}, new Date(e.at).toLocaleString()), el("td", {}, e.from_status ?? "–"),
    el("td", {}, e.to_status), el("td", {}, e.reason))));
  const jobs = (await api(`/jobs?agent_id=${agentId}&limit=200`)).filter((j) => ACTIVE.includes(j.state));
  const jobsOn = {};
  for (const j of jobs) for (const g of j.gpu_uuids) (jobsOn[g] ||= []).push(j);
  renderGpus(metrics(agent), jobsOn);
  $("#agent-jobs tbody").replaceChildren(...(jobs.length ? jobs.map((j) => el("tr", { "data-job-id": j.job_id },
    el("td", {}, jobLink(j)), el("td", { class: "name" }, el("bdi", {}, j.name ?? "")), el("td", {}, jobBadge(j.state)),
    el("td", { class: "name muted" }, j.gpu_uuids.join(", ") || "none"), el("td", {}, needs(j.requirements)),
    el("td", {}, ago((Date.now() - Date.parse(j.updated_at)) / 1000)))) :
    [el("tr", {}, el("td", { colSpan: 6, class: "muted" }, "no job is running here"))]));
}

// ---- jobs ----------------------------------------------------------------------------

const jobBadge = (s) => el("span", { class: `badge ${s}`, "data-state": s }, s.replace("_", " "));
const jobLink = (j) => el("a", { href: `#/jobs/${j.job_id}` }, j.job_id.slice(0, 8));

function needs(r) {
  const parts = [];
  if (r.gpus) parts.push(`${r.gpus} GPU${r.gpus > 1 ? "s" : ""}${r.vram_gb ? ` × ${r.vram_gb} GB` : ""}`);
  if (r.cpu_cores) parts.push(`${r.cpu_cores} cores`);
  if (r.memory_gb) parts.push(`${r.memory_gb} GB memory`);
  if (r.pool) parts.push(`pool ${r.pool}`);
  for (const [k, v] of Object.entries(r.labels || {})) parts.push(`${k}=${v}`);
  return parts.join(", ") || "nothing in particular";
}

function agentCell(j) {
  if (!j.agent_id) return el("span", { class: "muted" }, "–");
  return el("a", { href: `#/agents/${j.agent_id}` }, el("bdi", {}, j.agent_name ?? j.agent_id.slice(0, 8)));
}

async function loadJobs() {
  const query = new URLSearchParams({ limit: "200" });
  if ($("#j-state").value) query.set("state", $("#j-state").value);
  if ($("#j-agent").value) query.set("agent_id", $("#j-agent").value);
  const [jobs, agents] = await Promise.all([api(`/jobs?${query}`), api("/agents")]);
  const select = $("#j-agent");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "all"),
    ...agents.map((a) => el("option", { value: a.agent_id }, a.name)));
  select.value = chosen;
  const count = (states) => jobs.filter((j) => states.includes(j.state)).length;
  $("#job-counts").replaceChildren(
    card("queued", "Queued", count(["queued"])), card("running", "Running", count(DISPATCH.out)),
    card("finished", "Finished", jobs.length - count(ACTIVE)));
  $("#jobs tbody").replaceChildren(...jobs.map((j) => el("tr", { "data-job-id": j.job_id, "data-state": j.state },
    el("td", {}, jobLink(j)), el("td", { class: "name" }, el("bdi", {}, j.name ?? "")),
    el("td", {}, jobBadge(j.state), j.preemptions ? el("div", { class: "muted", "data-preemptions": j.preemptions }, `taken back ${j.preemptions}×`) : ""),
    el("td", { class: "name" }, agentCell(j)),
    el("td", { class: "command" }, shellJoin(j.command)),
    el("td", {}, new Date(j.submitted_at).toLocaleString()),
    el("td", { class: "num" }, j.exit_code ?? ""), el("td", {}, j.reason))));
  $("#jobs-shown").textContent = `${jobs.length} jobs, newest first`;
}

async function loadJob(jobId) {
  const job = await api(`/jobs/${jobId}`);
  $("#job-title").replaceChildren(el("bdi", { class: "name" }, job.name ?? job.job_id), " ", jobBadge(job.state));
  $("#job-facts").replaceChildren(
    card("id", "Job", job.job_id), card("needs", "Needs", needs(job.requirements)),
    card("agent", "On", agentCell(job)), card("gpus", "GPUs", job.gpu_uuids.join(", ") || "none"),
    card("exit", "Exit code", job.exit_code ?? "–"), card("attempt", "Attempt", job.attempt),
    card("preemptions", "Taken back", job.preemptions ? `${job.preemptions}× (no retry used)` : "never"));
  // textContent: a command is shown as the characters it is, never read as HTML
  $("#job-command").textContent = shellJoin(job.command);
  $("#job-workdir").textContent = job.workdir ?? "";
  for (const node of document.querySelectorAll("#job-run [data-workdir]")) node.hidden = !job.workdir;
  const why = job.state === "queued" ? "Waits: " : ACTIVE.includes(job.state) ? "" : "Ended: ";
  $("#job-reason").textContent = job.reason ? why + job.reason : "";
  $("#job-attempts tbody").replaceChildren(...job.attempts.map((a) => el("tr", { "data-attempt": a.attempt },
    el("td", { class: "num" }, a.attempt), el("td", {}, el("bdi", {}, a.agent_name ?? a.agent_id.slice(0, 8))),
    el("td", { class: "name muted" }, a.gpu_uuids.join(", ") || "none"), el("td", {}, jobBadge(a.state)),
    el("td", {}, a.started_at ? new Date(a.started_at).toLocaleTimeString() : "–"),
    el("td", {}, a.ended_at ? new Date(a.ended_at).toLocaleTimeString() : "–"),
    el("td", {}, a.peak_vram_gb ? Object.entries(a.peak_vram_gb).map(([g, gb]) => `${g}: ${fmt(gb)} GB`).join(", ") : "–"),
    el("td", {}, a.reason))));
  $("#job-events tbody").replaceChildren(...job.events.map((e) => el("tr", { "data-to": e.to_state },
    el("td", {}, new Date(e.at).toLocaleString()), el("td", {}, e.from_state ?? "–"),
    el("td", {}, e.to_state), el("td", {}, e.reason))));
  await followLog(job);
}

// The job's output, as it grows: each refresh asks from where the last answer ended.
async function followLog(job) {
  const log = state.log;
  if (log.jobId !== job.job_id || log.attempt !== job.attempt) {
    Object.assign(log, { jobId: job.job_id, attempt: job.attempt, offset: 0, text: "" });
  }
  if (job.attempt > 0) {
    for (let pages = 0; pages < 8; pages++) {
      const piece = await api(`/jobs/${job.job_id}/logs?attempt=${job.attempt}&offset=${log.offset}`);
      if (piece.offset > log.offset && log.text) log.text += "\n[… older output dropped …]\n";
      log.text = (log.text + piece.data).slice(-LOG_KEEP_CHARS);
      log.offset = piece.next_offset;
      if (!piece.data || piece.done) break;
    }
  }
  const pre = $("#job-log");
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.textContent = log.text;
  if (atEnd) pre.scrollTop = pre.scrollHeight;
  $("#job-log-note").textContent = job.attempt ? `attempt ${job.attempt}, ${log.offset} bytes` : "not started yet";
}

// ---- routing and the refresh loop ----------------------------------------------------

function currentRoute() {
  const agent = location.hash.match(/^#\/agents\/([0-9a-fA-F-]{36})$/);
  if (agent) return { view: "agent", agentId: agent[1] };
  const job = location.hash.match(/^#\/jobs\/([0-9a-fA-F-]{36})$/);
  if (job) return { view: "job", jobId: job[1] };
  return { view: location.hash === "#/jobs" ? "jobs" : "fleet" };
}

const LOADERS = {
  fleet: () => loadFleet(), jobs: () => loadJobs(),
  agent: (r) => loadAgent(r.agentId), job: (r) => loadJob(r.jobId),
};

function refresh() {
  const route = currentRoute();
  return poll(() => LOADERS[route.view](route));
}

function route() {
  const { view, agentId } = currentRoute();
  for (const name of ["fleet", "agent", "jobs", "job"]) $(`#${name}-view`).hidden = view !== name;
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.dataset.nav === (view === "job" ? "jobs" : view === "agent" ? "fleet" : view)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  destroyCharts();
  if (view === "agent") {
    $("#agent-title").replaceChildren("loading…");
    renderWindows(agentId);
  }
  refresh();
}

function setUp() {
  for (const th of document.querySelectorAll("#agents th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      renderTable();
    });
  }
  for (const id of ["#f-pool", "#f-status", "#f-temp", ...MINIMUMS.map(([input]) => input)]) $(id).addEventListener("input", renderTable);
  for (const id of ["#j-state", "#j-agent"]) $(id).addEventListener("input", refresh);
  $("#job-filters").addEventListener("submit", (event) => event.preventDefault());
  $("#filters").addEventListener("submit", (event) => event.preventDefault());
  setupLogin();
  window.addEventListener("hashchange", route);
  // A timer drives the next refresh only after the previous one finished: no pile-up.
  const loop = async () => { await refresh(); setTimeout(loop, REFRESH_MS); };
  setInterval(showConnection, 1000);
  route();
  setTimeout(loop, REFRESH_MS);
}

setUp();
