// The Switchyard console: every page reads the same APIs the CLI uses,
// with the API key kept in this tab's sessionStorage. Actions are shown
// only to keys whose role may take them; the API enforces roles anyway.
"use strict";

const $ = (id) => document.getElementById(id);

/** A DOM element: tag, attributes (on* are listeners), children (text is text). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const key = () => sessionStorage.getItem("switchyard-key");
let me = null;

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** Calls the API with the session's key; errors carry the API's message. */
async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${key()}` };
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, {
    method: options.method || "GET", headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const text = await r.text();
  let body;
  try { body = text ? JSON.parse(text) : {}; } catch { body = { error: text }; }
  if (!r.ok) {
    const e = body.error;
    const message = typeof e === "string" ? e : (e && e.message) || `${r.status} ${r.statusText}`;
    if (r.status === 401) signOut(message);
    throw new ApiError(r.status, message);
  }
  return body;
}

const may = (what) => !!me && me.may.includes(what);

function showError(e) {
  const el = $("error");
  el.hidden = !e;
  el.textContent = e ? `${e.message}` : "";
}

function signOut(message) {
  sessionStorage.removeItem("switchyard-key");
  me = null;
  $("main").hidden = true;
  $("login").hidden = false;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("login-error").textContent = message || "";
}

/** Asks before an action, showing what it will do. */
function confirmAction(title, body) {
  return new Promise((resolve) => {
    const d = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-body").textContent = body;
    d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
    d.showModal();
  });
}

/** Runs an action; on success reloads the page's data, on refusal says why. */
async function act(label, call) {
  try {
    await call();
    showError(null);
  } catch (e) {
    showError(new Error(`${label}: ${e.message}`));
  }
  render();
}

// ---- Models and versions ----------------------------------------------------

const STATES = ["offline_passed", "shadow", "canary", "ab_test", "promoted", "deprecated", "archived", "failed"];

function versionActions(model, v) {
  const out = h("div", { class: "actions" });
  if (may("deploy")) {
    const to = h("select", { "aria-label": "state", "data-action": "transition-state" },
      STATES.map((s) => h("option", { value: s }, s)));
    const pct = h("input", { type: "number", min: "1", max: "99", placeholder: "share %", "data-action": "transition-percent" });
    out.append(to, pct, h("button", {
      type: "button", class: "action", "data-action": "transition",
      onclick: () => act("transition", () => api(`/v1/registry/models/${model.name}/versions/${v.number}/transitions`, {
        method: "POST", body: { to: to.value, traffic_percent: pct.value ? Number(pct.value) : undefined, reason: "from the console" },
      })),
    }, "Move"));
    if (v.state === "canary" || v.state === "ab_test") {
      const share = h("input", { type: "number", min: "1", max: "99", value: v.traffic_percent, "data-action": "ramp-percent" });
      out.append(share, h("button", {
        type: "button", class: "action", "data-action": "ramp",
        onclick: () => act("ramp", () => api(`/v1/registry/models/${model.name}/versions/${v.number}/traffic`, {
          method: "POST", body: { traffic_percent: Number(share.value), reason: "from the console" },
        })),
      }, "Ramp"));
    }
  }
  if (may("approve")) {
    const target = h("select", { "aria-label": "approval target", "data-action": "approve-target" },
      ["canary", "ab_test", "promoted"].map((s) => h("option", { value: s }, s)));
    out.append(target, h("button", {
      type: "button", class: "action", "data-action": "approve",
      onclick: () => act("approve", () => api(`/v1/registry/models/${model.name}/versions/${v.number}/approvals`, {
        method: "POST", body: { target: target.value, comment: "approved from the console" },
      })),
    }, "Approve"));
  }
  return out;
}

async function rollback(model) {
  const plan = await api(`/v1/registry/models/${model}/rollback`, { method: "POST", body: { dry_run: true } });
  const text = [
    `roll back version(s) ${plan.rolled_back.join(", ")}`,
    `serving afterwards: ${plan.serving ?? "nothing"}`,
    `kind: ${plan.kind}`,
    ...(plan.steps || []).map((s) => `• ${s}`),
    ...(plan.needs_retrain && plan.needs_retrain.length ? [`needs retraining: ${plan.needs_retrain.join(", ")}`] : []),
  ].join("\n");
  if (await confirmAction(`Roll back ${model}?`, text)) {
    await api(`/v1/registry/models/${model}/rollback`, { method: "POST", body: { reason: "from the console" } });
  }
}

async function lineage(model, v, cell) {
  const l = await api(`/v1/registry/models/${model}/versions/${v}/lineage`);
  cell.replaceChildren(h("pre", {}, JSON.stringify(l, null, 1)));
}

async function renderModels() {
  const { models } = await api("/v1/registry/models");
  const root = $("models");
  const cards = [];
  for (const m of models) {
    const { versions } = await api(`/v1/registry/models/${m.name}/versions`);
    const rows = versions.map((v) => {
      const lineageCell = h("td", {}, h("button", { type: "button", onclick: (e) => lineage(m.name, v.number, e.target.parentNode) }, "show"));
      const status = v.status ? `${v.status.phase}: ${v.status.message}` : "";
      return h("tr", { "data-version": v.number },
        h("td", {}, v.number),
        h("td", { "data-field": "state" }, v.state + (v.traffic_percent ? ` ${v.traffic_percent}%` : "")),
        h("td", {}, (v.badges || []).map((b) => h("span", { class: "badge" }, b))),
        h("td", { "data-field": "approvals" }, (v.approvals || []).map((a) => `${a.target} by ${a.by}`).join("; ")),
        h("td", { class: v.status && v.status.phase === "failed" ? "bad" : "" }, status),
        lineageCell,
        h("td", {}, versionActions(m, v)));
    });
    cards.push(h("div", { class: "card", "data-model": m.name },
      h("h2", {}, m.name, " ", h("span", { class: "muted" }, `${m.class} · tier ${m.tier} · ${m.rollback_class} · owner ${m.owner}`)),
      may("deploy") ? h("div", { class: "actions" }, h("button", {
        type: "button", class: "action", "data-action": "rollback",
        onclick: () => act("rollback", () => rollback(m.name)),
      }, "Roll back…")) : null,
      h("table", {}, h("thead", {}, h("tr", {}, ["version", "state", "badges", "approvals", "status", "lineage", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows))));
  }
  root.replaceChildren(...(cards.length ? cards : [h("p", { class: "muted" }, "No model is registered.")]));
}

// ---- Routes ------------------------------------------------------------------

const history = new Map(); // route/arm -> [{t, rate, errors, p50, p99}]
const KEEP = 90;

function record(route, arm, served, window) {
  const k = `${route}/${arm}`;
  const list = history.get(k) || [];
  list.push({
    t: Date.now(),
    rate: served ? served.requests / window : 0,
    errors: served && served.requests ? served.errors / served.requests : 0,
    p50: served ? served.p50_ms : null,
    p99: served ? served.p99_ms : null,
  });
  while (list.length > KEEP) list.shift();
  history.set(k, list);
}

/** A small SVG line chart of `series` ([name, values]) over the kept history. */
function chart(title, series, unit) {
  const W = 300, H = 110, P = 24;
  const all = series.flatMap(([, v]) => v.filter((x) => x !== null && x !== undefined));
  const max = Math.max(1e-9, ...all);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "chart");
  const text = (x, y, s) => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = s; svg.append(t);
  };
  text(4, 12, `${title} (max ${max.toPrecision(3)} ${unit})`);
  const colors = ["#2f6fdf", "#d9822b", "#1e7b34", "#b3261e"];
  series.forEach(([name, values], i) => {
    const pts = values.map((v, j) => v === null || v === undefined ? null
      : `${P + (j * (W - 2 * P)) / Math.max(1, KEEP - 1)},${H - 8 - (v / max) * (H - 30)}`).filter(Boolean);
    if (pts.length) {
      const line = document.createElementNS(svg.namespaceURI, "polyline");
      line.setAttribute("points", pts.join(" ")); line.setAttribute("fill", "none");
      line.setAttribute("stroke", colors[i % colors.length]); line.setAttribute("stroke-width", "1.5");
      svg.append(line);
    }
    text(W - 90, 12 + 11 * (i + 1), name);
  });
  return svg;
}

async function renderRoutes() {
  const { routes } = await api("/v1/routes");
  const cards = [];
  for (const r of routes) {
    const arms = [["primary", r.primary]];
    if (r.candidate) arms.push([r.candidate.arm, r.candidate]);
    for (const [arm, d] of arms) record(r.name, arm, d.served, r.window_secs);
    let shadows = null;
    if (r.shadows.length) {
      const s = await api(`/v1/routes/${encodeURIComponent(r.name)}/shadows`).catch(() => null);
      shadows = h("table", {}, h("thead", {}, h("tr", {}, ["shadow", "compared", "mean similarity", "teacher-forced KL", "errors"].map((t) => h("th", {}, t)))),
        h("tbody", {}, (s && s.shadows ? s.shadows : []).map((x) => h("tr", {},
          h("td", {}, x.version ?? x.shadow ?? ""), h("td", {}, x.compared ?? ""),
          h("td", {}, x.mean_similarity ?? ""), h("td", {}, x.teacher_forced ? x.teacher_forced.mean_kl : ""),
          h("td", {}, x.errors ?? "")))));
    }
    const series = (field) => arms.map(([arm]) => [arm, (history.get(`${r.name}/${arm}`) || []).map((p) => p[field])]);
    const row = ([arm, d]) => h("tr", { "data-arm": arm },
      h("td", {}, arm), h("td", {}, d.version ?? "static"),
      h("td", {}, arm === "primary" ? (r.candidate ? `${100 - r.candidate.percent}%` : "100%") : `${d.percent}%`),
      h("td", { "data-field": "requests" }, d.served ? d.served.requests : "—"),
      h("td", {}, d.served ? d.served.errors : "—"),
      h("td", {}, d.served && d.served.p50_ms !== null ? d.served.p50_ms.toFixed(1) : "—"),
      h("td", {}, d.served && d.served.p99_ms !== null ? d.served.p99_ms.toFixed(1) : "—"));
    cards.push(h("div", { class: "card", "data-route": r.name },
      h("h2", {}, r.name, " ", h("span", { class: "muted" }, r.kind)),
      h("table", {}, h("thead", {}, h("tr", {}, ["arm", "version", "share", `requests (${r.window_secs} s)`, "errors", "p50 ms", "p99 ms"].map((t) => h("th", {}, t)))),
        h("tbody", {}, arms.map(row))),
      r.shadows.length ? h("p", {}, `shadows: ${r.shadows.map((s) => `v${s.version}`).join(", ")}`) : null,
      shadows,
      h("div", { class: "charts" },
        chart("requests/s", series("rate"), "/s"), chart("error rate", series("errors"), ""),
        chart("p50 latency", series("p50"), "ms"), chart("p99 latency", series("p99"), "ms"))));
  }
  $("routes").replaceChildren(...(cards.length ? cards : [h("p", { class: "muted" }, "This node routes nothing yet.")]));
}

// ---- Experiments -------------------------------------------------------------

function testCell(t) {
  if (!t) return "—";
  return `p=${Number(t.p_value).toPrecision(3)} (${t.test || "z"})${t.enough_data ? "" : " · not enough data"}`;
}

async function renderExperiments() {
  const { experiments } = await api("/v1/experiments");
  const cards = [];
  for (const e of experiments) {
    const s = await api(`/v1/experiments/${encodeURIComponent(e.name)}/summary`);
    cards.push(h("div", { class: "card", "data-experiment": e.name },
      h("h2", {}, e.name, " ", h("span", { class: "muted" }, `route ${e.route} · ${e.traffic}% of traffic`)),
      h("table", {}, h("thead", {}, h("tr", {}, ["arm", "weight", "requests", "errors", "feedback"].map((t) => h("th", {}, t)))),
        h("tbody", {}, s.arms.map((a) => h("tr", { "data-arm": a.name },
          h("td", {}, a.name), h("td", {}, (e.arms.find((x) => x.name === a.name) || {}).weight ?? ""),
          h("td", { "data-field": "requests" }, a.requests), h("td", {}, a.errors ?? ""),
          h("td", {}, a.feedback && a.feedback.count ? `${a.feedback.count}, ${(100 * a.feedback.positive_rate).toFixed(0)}% positive` : "none"))))),
      h("table", {}, h("thead", {}, h("tr", {}, ["arm vs control", "latency", "error rate", "positive feedback", "enough data"].map((t) => h("th", {}, t)))),
        h("tbody", {}, (s.comparisons || []).map((c) => h("tr", {},
          h("td", {}, `${c.arm} vs ${c.control}`), h("td", {}, testCell(c.latency)), h("td", {}, testCell(c.error_rate)),
          h("td", {}, testCell(c.positive_feedback_rate)),
          h("td", { "data-field": "enough_data" }, String(!!(c.latency && c.latency.enough_data)))))))));
  }
  $("experiments").replaceChildren(...(cards.length ? cards : [h("p", { class: "muted" }, "No prompt experiment is configured.")]));
}

// ---- The Triton plane ----------------------------------------------------------

function bars(title, counts) {
  const W = 300, H = 110;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "chart");
  const max = Math.max(1, ...counts.map(([, n]) => n));
  const w = (W - 20) / Math.max(1, counts.length);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(svg.namespaceURI, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
  };
  add("text", { x: 4, y: 12 }, title);
  counts.forEach(([size, n], i) => {
    const bh = (n / max) * (H - 40);
    add("rect", { x: 10 + i * w, y: H - 16 - bh, width: Math.max(2, w - 4), height: bh, fill: "#2f6fdf" });
    add("text", { x: 10 + i * w, y: H - 4 }, `${size}:${n}`);
  });
  return svg;
}

async function renderTriton() {
  const r = await fetch("/v2/repository/index", { method: "POST", headers: { Authorization: `Bearer ${key()}` }, body: "{}" });
  if (!r.ok) {
    $("triton").replaceChildren(h("p", { class: "muted" }, "This node serves no model repository."));
    return;
  }
  const index = await r.json();
  const rows = [];
  const charts = [];
  for (const m of index) {
    rows.push(h("tr", { "data-model": m.name }, h("td", {}, m.name), h("td", {}, m.version || ""),
      h("td", { class: m.state === "READY" ? "good" : "bad" }, m.state), h("td", {}, m.reason || "")));
    if (m.state !== "READY") continue;
    const s = await api(`/v2/models/${encodeURIComponent(m.name)}/stats`).catch(() => null);
    for (const st of (s && s.model_stats) || []) {
      const counts = (st.batch_stats || []).map((b) => [b.batch_size, b.compute_infer.count]);
      if (counts.length) charts.push(bars(`${st.name} v${st.version}: executions by batch size`, counts));
    }
  }
  $("triton").replaceChildren(
    h("table", {}, h("thead", {}, h("tr", {}, ["model", "version", "state", "reason"].map((t) => h("th", {}, t)))), h("tbody", {}, rows)),
    h("div", { class: "charts" }, charts));
}

// ---- Audit -------------------------------------------------------------------

async function renderAudit() {
  const v = await api("/v1/registry/audit/verify");
  $("verify").replaceChildren(h("span", { class: v.ok ? "good" : "bad", "data-field": "verify" },
    v.ok ? `The audit chain verifies: ${v.entries} entries.` : `The audit chain does not verify: ${JSON.stringify(v.first_bad)}`));
  const model = $("audit-model").value.trim();
  const action = $("audit-action").value.trim();
  const actor = $("audit-actor").value.trim();
  const q = new URLSearchParams({ limit: "10000" });
  if (model) q.set("model", model);
  const { entries } = await api(`/v1/registry/audit?${q}`);
  const shown = entries.filter((e) => (!action || e.action === action) && (!actor || e.actor === actor)).reverse();
  $("audit").tBodies[0].replaceChildren(...shown.slice(0, 500).map((e) => h("tr", {},
    h("td", {}, e.seq), h("td", {}, e.at), h("td", {}, e.actor), h("td", {}, e.action), h("td", {}, e.model),
    h("td", {}, e.version ?? ""), h("td", {}, h("code", {}, JSON.stringify(e.details).slice(0, 300))))));
}

// ---- Wiring ------------------------------------------------------------------

const RENDER = { models: renderModels, routes: renderRoutes, experiments: renderExperiments, triton: renderTriton, audit: renderAudit };
const LIVE = new Set(["routes", "triton", "experiments"]);

async function render() {
  const page = document.body.dataset.page;
  try {
    await RENDER[page]();
    if ($("error").textContent === "") $("error").hidden = true;
  } catch (e) {
    if (e.status !== 401) showError(e);
  }
}

async function start() {
  if (!key()) return signOut();
  try {
    me = await api("/v1/registry/whoami");
  } catch (e) {
    return signOut(e.message);
  }
  $("who").textContent = `${me.name} (${me.role})`;
  $("signout").hidden = false;
  $("login").hidden = true;
  $("main").hidden = false;
  await render();
  if (LIVE.has(document.body.dataset.page)) setInterval(render, 2000);
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("switchyard-key", $("key").value);
  $("key").value = "";
  start();
});
$("signout").addEventListener("click", () => signOut());
const filter = $("audit-filter");
if (filter) filter.addEventListener("submit", (e) => { e.preventDefault(); render(); });
start();
