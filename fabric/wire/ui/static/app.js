// Fabric's live status page (fabric/wire/ui): no build step, no dependencies.
// Every string shown comes from site reports, which are hostile input: the DOM is built
// with text nodes and attributes only, never parsed as markup.
"use strict";

const TOKEN_KEY = "fabric-token";
const STALE_S = 15;           // a report older than this is marked stale
const POLL_MS = 1000;         // polling without an event stream (a site agent's page)
const RESYNC_MS = 5000;       // re-read the status now and then even with a live stream
const KEEP_EVENTS = 50, KEEP_ERRORS = 30;

const S = {
  config: null, sites: [], seen: new Map(), rates: new Map(), events: [], errors: [],
  lastSeq: 0, epoch: null, abort: null, timers: [], refreshPending: null, updated: null, reading: null, again: false,
};

const $ = (id) => document.getElementById(id);
const token = () => sessionStorage.getItem(TOKEN_KEY);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function el(tag, attrs, ...kids) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") n.className = v;
    else if (k === "width") n.style.width = v;  // CSSOM, allowed by the CSP (no inline style attributes)
    else n.setAttribute(k, String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === undefined || kid === null || kid === false) continue;
    n.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return n;
}

function bytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
const ago = (t) => (typeof t === "number" ? Math.max(0, Date.now() / 1000 - t) : null);
const agoText = (s) => (s === null ? "never" : s < 1 ? "just now" : `${s.toFixed(0)}s ago`);
const text = (v) => (v === undefined || v === null || v === "" ? "–" : String(v));
const list = (v) => (Array.isArray(v) ? v : []);
const obj = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});

// --- talking to the server ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function apiError(r) {
  let body = {};
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  return new ApiError(r.status, String(body.code || r.status), String(body.message || r.statusText));
}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${token()}` }, cache: "no-store" });
  if (!r.ok) throw await apiError(r);
  return r.json();
}

const refused = (e) => e instanceof ApiError && (e.status === 401 || e.status === 403);

function noteError(where, message) {
  S.errors.unshift({ at: Date.now() / 1000, where, message });
  S.errors.length = Math.min(S.errors.length, KEEP_ERRORS);
}

function refresh() {  // one read at a time, and one more if asked meanwhile: answers never land out of order
  if (S.reading) { S.again = true; return S.reading; }
  S.reading = (async () => {
    try { do { S.again = false; await load(); } while (S.again); } finally { S.reading = null; }
  })();
  return S.reading;
}

async function load() {
  const data = await api(S.config.status);
  const sites = S.config.role === "origin" ? list(data.sites) : [Object.assign({ received: data.at }, data)];
  for (const s of sites) rates(s);
  S.sites = sites.filter((s) => s && typeof s.site === "string").sort((a, b) => (a.site < b.site ? -1 : 1));
  S.updated = Date.now() / 1000;
  render();
}

function scheduleRefresh() {  // events come in bursts: one read for each burst
  if (S.refreshPending) return;
  S.refreshPending = setTimeout(async () => {
    S.refreshPending = null;
    try { await refresh(); } catch (e) { failed(e, "status"); }
  }, 100);
}

function rates(site) {  // bytes per second from each source, from the last two reports' counters
  const now = { at: site.received, fetched: obj(site.fetched) };
  const before = S.seen.get(site.site);
  if (before && typeof now.at === "number" && now.at > before.at) {
    const r = {};
    for (const [src, n] of Object.entries(now.fetched)) r[src] = Math.max(0, (n - (before.fetched[src] || 0)) / (now.at - before.at));
    S.rates.set(site.site, r);
  }
  if (!before || now.at !== before.at) S.seen.set(site.site, now);
}

// --- the event stream: fetch() and a reader, since EventSource sends no Authorization ------------

async function follow(signal) {
  let backoff = 500;
  while (!signal.aborted) {
    try {
      const r = await fetch(`${S.config.events}?after=${S.lastSeq}`,
        { headers: { Authorization: `Bearer ${token()}` }, cache: "no-store", signal });
      if (!r.ok) throw await apiError(r);
      conn("live", "live");
      backoff = 500;
      await readEvents(r.body.getReader(), onEvent);
    } catch (e) {
      if (signal.aborted) return;
      if (refused(e)) { logout(`the token was refused: ${e.message}`); return; }
      noteError("event stream", e.message || String(e));
    }
    if (signal.aborted) return;
    conn("retrying", `reconnecting in ${(backoff / 1000).toFixed(1)}s`);
    render();
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

async function readEvents(reader, dispatch) {
  const decoder = new TextDecoder();
  let buf = "", type = "message", data = [], id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") {
        if (data.length) dispatch(type, data.join("\n"), id);
        type = "message"; data = []; id = null;
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = value;
        else if (field === "data") data.push(value);
        else if (field === "id") id = value;
      }
    }
  }
}

function onEvent(type, raw, id) {
  let e;
  try { e = JSON.parse(raw); } catch (_) { return; }
  if (id !== null && /^\d+$/.test(id)) S.lastSeq = Number(id);
  if (type === "hello") {
    if (S.epoch !== null && e.epoch !== S.epoch) S.lastSeq = Number(e.seq) || 0;  // a restarted origin
    S.epoch = e.epoch;
  } else if (type === "version") {
    remember(e, `${e.artifact}@${e.version} published`);
  } else if (type === "channel") {
    remember(e, e.action === "stage" ? `${e.artifact}:${e.channel} stages ${text(e.staged)} (serving ${e.version})`
      : `${e.artifact}:${e.channel} → ${e.version} (${e.action})`);
  }
  scheduleRefresh();
}

function remember(e, what) {
  S.events.unshift({ at: e.at, what });
  S.events.length = Math.min(S.events.length, KEEP_EVENTS);
}

// --- rendering --------------------------------------------------------------------------------

function render() {
  $("tree").replaceChildren(tree());
  $("sites").replaceChildren(...(S.sites.length ? S.sites.map(siteCard) : [el("p", { class: "empty" }, "no site has reported yet")]));
  $("rollouts").replaceChildren(rollouts());
  $("staged").replaceChildren(staged());
  $("errors").replaceChildren(...errors());
  $("events").replaceChildren(...(S.events.length ? S.events.map((e) => el("li", {}, el("span", { class: "meta" }, timeOf(e.at)), " ", e.what))
    : [el("li", { class: "empty" }, S.config.events ? "no event yet" : "this server has no event stream (polling)")]));
  $("updated").textContent = S.updated ? `status read ${agoText(ago(S.updated))}` : "";
}

const timeOf = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleTimeString() : "");
const actives = (s) => list(s.channels).map((c) => `${c.artifact}:${c.channel} ${text(c.active)}`).join(", ");

function tree() {
  const names = new Set(S.sites.map((s) => s.site));
  const children = new Map();
  for (const s of S.sites) {
    const up = names.has(s.upstream) ? s.upstream : "origin";
    if (!children.has(up)) children.set(up, []);
    children.get(up).push(s);
  }
  const node = (s) => el("li", { "data-node": s.site },
    el("span", { class: "node" }, el("strong", {}, s.site), el("span", { class: "version" }, actives(s)),
      s.upstream && !names.has(s.upstream) && s.upstream !== "origin" ? el("span", { class: "meta" }, `via ${s.upstream}`) : null),
    children.has(s.site) ? el("ul", {}, children.get(s.site).map(node)) : null);
  if (S.config.role === "site") {
    const s = S.sites[0];
    if (!s) return el("p", { class: "empty" }, "–");
    return el("ul", { class: "tree" }, el("li", {}, el("span", { class: "node" }, text(s.upstream || "origin")),
      el("ul", {}, el("li", { "data-node": s.site }, el("span", { class: "node" }, el("strong", {}, s.site),
        el("span", { class: "version" }, actives(s)))))));
  }
  return el("ul", { class: "tree" }, el("li", { "data-node": "origin" }, el("span", { class: "node" }, el("strong", {}, "origin")),
    el("ul", {}, (children.get("origin") || []).map(node))));
}

function table(head, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

function siteCard(s) {
  const age = ago(s.received);
  const stale = age === null || age > STALE_S;
  const staging = list(s.channels).some((c) => obj(c.staged).version);  // a column only while it says something
  const channels = list(s.channels).map((c) => {
    const syncing = c.syncing && c.bytes_total ? Math.min(1, c.bytes_done / c.bytes_total) : null;
    return el("tr", { "data-channel": `${c.artifact}:${c.channel}` },
      el("td", {}, `${c.artifact}:${c.channel}`),
      el("td", { class: "version", "data-field": "active" }, text(c.active)),
      el("td", { class: `version ${c.target && c.target !== c.active ? "warn" : ""}`, "data-field": "target" }, text(c.target)),
      el("td", { "data-field": "sync" }, syncing === null ? (c.syncing ? `fetching ${c.syncing}` : "idle")
        : [el("span", { class: "bar" }, el("span", { width: `${(100 * syncing).toFixed(0)}%` })),
           `${c.syncing} ${bytes(c.bytes_done)} / ${bytes(c.bytes_total)}`]),
      staging ? el("td", { class: "version", "data-field": "staged" }, stagedText(c.staged)) : null,
      el("td", { class: "bad" }, c.error || ""));
  });
  const r = S.rates.get(s.site) || {};
  const links = Object.entries(obj(s.fetched)).map(([src, n]) => el("tr", { "data-link": src },
    el("td", {}, `${src} → ${s.site}`), el("td", {}, bytes(n)), el("td", {}, src in r ? (r[src] ? `${bytes(r[src])}/s` : "idle") : "–")));
  const workers = list(s.workers).map((w) => {
    const rep = obj(w.last_report);
    return el("tr", { "data-worker": w.worker },
      el("td", {}, w.worker), el("td", {}, w.artifact),
      el("td", { class: "version", "data-field": "serving" }, text(w.serving)),
      el("td", { class: "version" }, text(w.assigned)), el("td", {}, text(w.role)),
      el("td", { class: w.state === "dead" || w.state === "failed" ? "bad" : "" }, text(w.state)),
      el("td", {}, rep.version ? `${rep.version} ${rep.ok ? "ok" : "failed"}${rep.pause_ms != null ? `, paused ${Number(rep.pause_ms).toFixed(1)} ms` : ""}` : "–"));
  });
  const bad = Object.entries(obj(s.bad)).filter(([, v]) => list(v).length).map(([a, v]) => `${a}: ${list(v).join(", ")}`);
  return el("div", { class: "site", "data-site": s.site },
    el("h3", {}, s.site,
      el("span", { class: "meta" }, `upstream ${text(s.upstream || "origin")}`),
      el("span", { class: s.ready ? "ok" : "warn" }, s.ready ? "ready" : "not ready"),
      el("span", { class: stale ? "stale" : "meta", "data-field": "age" }, `${stale ? "stale: " : ""}reported ${agoText(age)}`),
      typeof s.disk_used === "number" ? el("span", { class: "meta" }, `disk ${(100 * s.disk_used).toFixed(0)}% used`) : null),
    table(["channel", "active", "target", "sync", ...(staging ? ["staged"] : []), "error"], channels),
    links.length ? table(["link", "fetched", "rate"], links) : null,
    workers.length ? table(["worker", "artifact", "serving", "assigned", "role", "state", "last load"], workers) : null,
    bad.length ? el("p", { class: "bad" }, `rejected here: ${bad.join("; ")}`) : null);
}

function rollouts() {
  const rows = [];
  for (const s of S.sites) for (const ro of list(s.rollouts)) {
    rows.push(el("tr", { "data-rollout": `${s.site}/${ro.artifact}` },
      el("td", {}, s.site), el("td", {}, ro.artifact), el("td", { class: "version" }, text(ro.version)),
      el("td", { class: "version" }, text(ro.previous)),
      el("td", { class: ro.phase === "rejected" ? "bad" : ro.phase === "done" ? "ok" : "warn" }, text(ro.phase)),
      el("td", {}, text(ro.canary)), el("td", {}, list(ro.failed).join(", ")), el("td", { class: "bad" }, ro.error || "")));
  }
  return rows.length ? table(["site", "artifact", "version", "previous", "phase", "canary", "failed", "reason"], rows)
    : el("p", { class: "empty" }, "no rollout yet");
}

function stagedText(st) {  // a channel's staged version as a site reports it: "v3 held", "v3 40%"
  st = obj(st);
  if (!st.version) return "–";
  let state = text(st.state);
  if (st.state === "fetching" && typeof st.bytes_total === "number" && st.bytes_total > 0)
    state = `${(100 * Math.min(Number(st.bytes_done) || 0, st.bytes_total) / st.bytes_total).toFixed(0)}%`;
  return `${st.version} ${state}`;
}

function staged() {  // per channel and staged version: how many of the sites following it hold it (as `fabric status`)
  const following = new Map(), counts = new Map();
  for (const s of S.sites) for (const c of list(s.channels)) {
    const name = `${text(c.artifact)}:${text(c.channel)}`;
    following.set(name, (following.get(name) || 0) + 1);
    const st = obj(c.staged);
    if (!st.version) continue;
    const key = JSON.stringify([name, String(st.version)]);
    const n = counts.get(key) || { held: 0, fetching: 0, failed: 0 };
    n[st.state === "held" ? "held" : st.state === "fetching" ? "fetching" : "failed"] += 1;
    counts.set(key, n);
  }
  const rows = [...counts.keys()].sort().map((key) => {
    const [name, version] = JSON.parse(key), n = counts.get(key), of = following.get(name);
    return el("tr", { "data-staged": `${name}@${version}` },
      el("td", {}, name), el("td", { class: "version" }, version),
      el("td", { class: n.held === of ? "ok" : "warn", "data-field": "held" }, `held at ${n.held} of ${of}`),
      el("td", {}, n.fetching ? `${n.fetching} fetching` : ""), el("td", { class: n.failed ? "bad" : "" }, n.failed ? `${n.failed} failed or refused` : ""));
  });
  return rows.length ? table(["channel", "staged version", "sites holding it", "fetching", "failed"], rows)
    : el("p", { class: "empty" }, "nothing staged");
}

function errors() {
  const out = [];
  for (const s of S.sites) {
    const age = ago(s.received);
    if (age === null || age > STALE_S) out.push([s.site, `no report for ${agoText(age)}`]);
    for (const c of list(s.channels)) if (c.error) out.push([s.site, `${c.artifact}:${c.channel}: ${c.error}`]);
    for (const ro of list(s.rollouts)) if (ro.error) out.push([s.site, `${ro.artifact}@${ro.version} ${ro.phase}: ${ro.error}`]);
    for (const w of list(s.workers)) { const r = obj(w.last_report); if (r.ok === false) out.push([s.site, `${w.worker}: ${r.version} failed: ${text(r.error)}`]); }
  }
  for (const e of S.errors) out.push([`${e.where} ${timeOf(e.at)}`, e.message]);
  return out.length ? out.map(([who, what]) => el("li", {}, el("strong", {}, who), " ", what)) : [el("li", { class: "empty" }, "none")];
}

// --- login, live updates ----------------------------------------------------------------------

function conn(state, label) { const c = $("conn"); c.dataset.state = state; c.textContent = label; }

function failed(e, where) {
  if (refused(e)) { logout(`the token was refused: ${e.message}`); return; }
  noteError(where, e.message || String(e));
  conn("error", `cannot read ${where}`);
  render();
}

function stop() {
  if (S.abort) S.abort.abort();
  S.abort = null;
  S.timers.forEach(clearInterval);
  S.timers = [];
}

function logout(message) {
  stop();
  sessionStorage.removeItem(TOKEN_KEY);
  $("main").hidden = true; $("logout").hidden = true; $("login").hidden = false;
  $("login-error").textContent = message || "";
  conn("idle", "not connected");
}

async function start() {
  try {
    await refresh();
  } catch (e) {
    if (refused(e)) logout(`the token was refused (${e.status} ${e.code}): ${e.message}`);
    else { stop(); $("login").hidden = false; $("login-error").textContent = `cannot read the status: ${e.message}`; }
    return;
  }
  $("login").hidden = true; $("main").hidden = false; $("logout").hidden = false; $("login-error").textContent = "";
  const poll = async () => { try { await refresh(); } catch (e) { failed(e, "status"); } };
  S.timers.push(setInterval(render, 1000));  // ages tick
  if (S.config.events) {
    S.abort = new AbortController();
    S.timers.push(setInterval(poll, RESYNC_MS));
    follow(S.abort.signal);
  } else {
    conn("polling", `polling every ${POLL_MS / 1000}s`);
    S.timers.push(setInterval(poll, POLL_MS));
  }
}

async function main() {
  S.config = await (await fetch("ui.json", { cache: "no-store" })).json();
  $("role").textContent = S.config.role === "origin" ? "origin: every site" : "site agent";
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    $("token").value = "";
    stop();
    sessionStorage.setItem(TOKEN_KEY, t);
    start();
  });
  $("logout").addEventListener("click", () => logout(""));
  if (token()) start();
}

main();
