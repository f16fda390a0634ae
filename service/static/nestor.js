// Shared by the dashboard pages: sign-in, the API with the bearer token, server-sent events
// read over fetch (EventSource cannot send an Authorization header, and the token must never
// go into a URL), DOM helpers that only ever set text (names are user input), formatting.

const TOKEN_KEY = "nestor.token";

export const OPTIMIZER_COLORS = {
  adan: "#d62728", adanw: "#ff7f0e", adamw: "#1f77b4", amsgrad: "#17becf",
  lamb: "#2ca02c", "lookahead(adan)": "#9467bd", "lookahead(adamw)": "#8c564b",
  "lookahead(lamb)": "#e377c2",
};
const FALLBACK = ["#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39"];

export function colorFor(label, seen = new Map()) {
  if (OPTIMIZER_COLORS[label]) return OPTIMIZER_COLORS[label];
  if (!seen.has(label)) seen.set(label, FALLBACK[seen.size % FALLBACK.length]);
  return seen.get(label);
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function authHeaders() { return { Authorization: `Bearer ${token()}` }; }

function detailText(body, fallback) {
  if (!body || body.detail === undefined) return fallback;
  if (typeof body.detail === "string") return body.detail;
  return body.detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn("Your token was not accepted; sign in again.");
    throw new ApiError(401, "not signed in");
  }
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new ApiError(resp.status, detailText(data, `${resp.status} ${resp.statusText}`));
  return data;
}

// ---- who is signed in ---------------------------------------------------------------------

// The signed-in token's user and scopes, {user_id, user, token_id, scopes}: asked once per page
// load, shared by everything on the page.
let meLoading = null;
export function me() {
  meLoading ||= api("/v1/me").catch((err) => { meLoading = null; throw err; });
  return meLoading;
}

// The service's rule: "admin" grants every scope, "code" grants "submit".
export function hasScope(who, scope) {
  const s = who.scopes;
  return s.includes(scope) || s.includes("admin") || (scope === "submit" && s.includes("code"));
}

const OWNER_ACTIONS = new Set(["cancel", "retry", "delete"]);

// Whether `who` (from me()) may cancel, retry or delete (artifacts) a job or sweep of `owner`
// (a user's name): an admin always; anyone else with "submit" on their own. The page hides
// what this refuses; the service still decides (a 403 is shown with actionFailed).
export function can(who, action, owner) {
  if (!OWNER_ACTIONS.has(action)) throw new Error(`unknown action: ${action}`);
  if (hasScope(who, "admin")) return true;
  return hasScope(who, "submit") && owner !== null && owner !== undefined && who.user === owner;
}

// The notice for an action the service refused or that failed: a 403's detail names the missing
// scope or says whose the job is (the page's view of the permissions was out of date).
export function actionFailed(what, err) {
  return notice("error", err.status === 403 ? `${what} not allowed: ${err.message}` : `${what} failed: ${err.message}`);
}

// Server-sent events over fetch: calls handlers[event](data) until the stream ends or
// `signal` aborts. Resolves when the server closes the stream. `cursor.lastEventId` is the
// last message's id; pass the same cursor again to resume after a reconnect.
export async function streamEvents(path, handlers, signal, cursor = {}) {
  const headers = authHeaders();
  if (cursor.lastEventId) headers["Last-Event-ID"] = cursor.lastEventId;
  const resp = await fetch(path, { headers, signal });
  if (!resp.ok) throw new ApiError(resp.status, `event stream: ${resp.status}`);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) { // ":" lines are keep-alive comments
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        else if (line.startsWith("id:")) cursor.lastEventId = line.slice(3).trim();
      }
      if (handlers[event]) handlers[event](JSON.parse(data.join("\n") || "null"));
    }
  }
}

// el("a", {href: "/x", class: "y"}, "text", child...): strings become text nodes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function notice(kind, ...text) { return el("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, ...text); }

export function badge(status) { return el("span", { class: `badge ${status}`, "data-status": status }, status.replace("_", " ")); }

export function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "object") { // a sweep value that replaces a whole part of the spec
    if (v.name !== undefined && v.lr !== undefined) return `${optimizerLabel({ optimizer: v })} lr=${v.lr}`;
    return Object.entries(v).filter(([, x]) => x !== null)
      .map(([k, x]) => `${k}=${typeof x === "object" ? JSON.stringify(x) : x}`).join(" ");
  }
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toPrecision(digits);
}

export function fmtBatch(b) {
  return b >= 1024 && b % 1024 === 0 ? `${b / 1024}k` : String(b);
}

// 1536 -> "1.5 KiB"
export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  for (n /= 1024; n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return `${n < 100 ? n.toFixed(1) : n.toFixed(0)} ${units[i]}`;
}

// Milliseconds since the epoch of the API's times (UTC; some are written without an offset).
export function parseTime(iso) {
  return Date.parse(/Z|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
}

export function fmtTime(iso) {
  if (!iso) return "–";
  return new Date(parseTime(iso)).toLocaleString();
}

// A job's workers: "2", or an elastic job's "3 of 2–4" (its size now, of its range).
export function workersLabel(job) {
  const n = job.spec.num_workers;
  if (n === null || typeof n !== "object") return String(n);
  return `${job.workers ?? "–"} of ${n.min}–${n.max}`;
}

// "40 s", "12 min", "3.5 h" from now to an API time (as the CLI's `nestor jobs` says it).
export function fmtIn(iso) {
  const seconds = Math.max(0, (parseTime(iso) - Date.now()) / 1000);
  if (seconds < 90) return `${seconds.toFixed(0)} s`;
  if (seconds < 90 * 60) return `${(seconds / 60).toFixed(0)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// Where a queued or running job stands, in words: its place, start and reason, or its rate
// and end (null for an ended job).
export function timing(job) {
  if (job.status === "queued") {
    const parts = [];
    if (job.queue_position) parts.push(`#${job.queue_position} in the queue`);
    parts.push(job.estimated_start ? `starts in ~${fmtIn(job.estimated_start)}` : "start not known yet");
    if (job.pending_reason) parts.push(job.pending_reason);
    return `Waiting: ${parts.join("; ")}`;
  }
  if (job.status === "running") {
    const on = job.workers ? ` on ${job.workers} worker${job.workers === 1 ? "" : "s"}` : "";
    if (job.steps_per_second == null || !job.estimated_end) return `Running${on}: no rate yet`;
    return `Running${on}: ${fmt(job.steps_per_second, 3)} steps/s, ends in ~${fmtIn(job.estimated_end)}`;
  }
  return null;
}

// The same label as workers.spec.optimizer_label: "adan", "lookahead(adamw)", "adan (int8)".
export function optimizerLabel(spec) {
  const opt = (spec && spec.optimizer) || {};
  const label = opt.lookahead ? `lookahead(${opt.name})` : opt.name || "?";
  const precision = opt.state_precision || "fp32";
  return precision === "fp32" ? label : `${label} (${precision})`;
}

// ---- sign-in ------------------------------------------------------------------------------

let started = false;

function showSignIn(message) {
  if (document.getElementById("signin")) return; // already asking (parallel requests, timers)
  const main = document.querySelector("main");
  main.replaceChildren();
  document.body.classList.add("signed-out");
  const error = message ? notice("error", message) : null;
  const input = el("input", {
    id: "token", name: "token", type: "password", autocomplete: "current-password",
    placeholder: "nst_…", required: true,
  });
  const form = el(
    "form", { class: "card signin", method: "post", id: "signin" },
    el("h1", {}, "Sign in to Nestor"),
    el("label", { for: "token" }, "API token"),
    input,
    error,
    el("button", { class: "primary", type: "submit" }, "Sign in"),
    el("p", { class: "muted" },
      "The admin token is in NESTOR_HOME/admin_token (~/.nestor/admin_token by default; `nestor serve` prints where)."),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const candidate = input.value.trim();
    const resp = await fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${candidate}` } });
    if (resp.ok) {
      sessionStorage.setItem(TOKEN_KEY, candidate);
      location.reload();
    } else {
      form.querySelector(".notice")?.remove();
      form.insertBefore(notice("error", resp.status === 401
        ? "That token was not accepted." : `Sign-in failed: ${resp.status}`), form.lastChild.previousSibling);
      input.select();
    }
  });
  main.append(form);
  input.focus();
}

// Runs `render(main)` once signed in; every page starts here.
export function start(render) {
  document.getElementById("signout")?.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.href = "/";
  });
  if (!token()) return showSignIn();
  if (started) return undefined;
  started = true;
  const main = document.querySelector("main");
  return render(main).catch((err) => {
    if (err instanceof ApiError && err.status === 401) return;
    main.append(notice("error", `Could not load this page: ${err.message}`));
  });
}

// ---- charts -------------------------------------------------------------------------------

// plotly.js is fetched in parallel with the page's data (the pages preload their bundle:
// the basic one, 1.2 MB, for a job page, the full one, 4.8 MB, for a sweep's) and executed
// once, when a page first needs it.
let plotlyLoading = null;
export function loadPlotly() {
  plotlyLoading ||= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = document.getElementById("plotly")?.getAttribute("href") || "/vendor/plotly.min.js";
    script.onload = () => resolve(window.Plotly);
    script.onerror = () => reject(new Error("could not load the charting library"));
    document.head.append(script);
  });
  return plotlyLoading;
}

export const PLOT_CONFIG = { responsive: true, displaylogo: false };

export function layout(title, extra = {}) {
  return {
    title: { text: title, font: { size: 14 } },
    margin: { l: 60, r: 20, t: 40, b: 40 },
    legend: { orientation: "h", y: -0.18 },
    xaxis: { title: { text: "step" } },
    hovermode: "x unified",
    ...extra,
  };
}
