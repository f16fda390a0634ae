// The job page's outputs: its log (followed over server-sent events while the job runs, read
// page by page once it has ended) and its artifacts (signed download links, deletion).
import { actionFailed, api, el, fmtBytes, fmtTime, notice, parseTime, streamEvents } from "./nestor.js";

const MAX_LOG_LINES = 5000; // lines kept in the page: the DOM stays small however long the log
const LOG_PAGE = 10_000; // the API's largest page
// A job is marked ended a few seconds before its driver's last lines reach the log (seen:
// up to ~3 s): after the end, read on this long.
const SETTLE_MS = 6000;
const LINK_REFRESH_MS = 45 * 60_000; // signed links live an hour: list them again before that
const ANSI = /\x1b\[[0-?]*[ -/]*[@-~]/g; // terminal colours and styles (Ray's own lines have them)

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The "Log" card. `load(live, finishedAt)` follows the log until the job ends (live) or reads
// it whole.
export function logPanel(jobId) {
  const pre = el("pre", { id: "log", class: "log", tabindex: 0, "data-state": "loading" },
    el("span", { class: "log-empty" }, "Loading…"));
  const caption = el("p", { class: "muted", id: "log-caption" });
  const problem = el("div");
  const node = el("div", { class: "card wide" }, el("h2", {}, "Log"), caption, problem, pre);
  let lines = 0; // lines received
  let next = 0; // the cursor after them

  // Within a few pixels of the end: new lines scroll into view; scrolled up: left alone.
  const atBottom = () => pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;

  function add(page) {
    next = page.next;
    const fresh = page.lines.slice(-MAX_LOG_LINES);
    if (!fresh.length && !page.notice) return;
    const follow = atBottom();
    if (!lines) pre.replaceChildren(); // the placeholder
    const batch = document.createDocumentFragment();
    if (page.notice) batch.append(el("span", { class: "log-notice" }, page.notice));
    for (const line of fresh) batch.append(el("span", {}, line.replace(ANSI, "")));
    pre.append(batch);
    lines += page.lines.length;
    const extra = pre.childElementCount - MAX_LOG_LINES;
    if (extra > 0) {
      const range = document.createRange();
      range.setStartBefore(pre.firstChild);
      range.setEndAfter(pre.children[extra - 1]);
      range.deleteContents();
      caption.textContent = `Showing the last ${MAX_LOG_LINES} lines; \`nestor logs ${jobId}\` prints them all.`;
    }
    if (follow) pre.scrollTop = pre.scrollHeight;
  }

  async function done(text, endedAt) {
    for (let i = 0; i < SETTLE_MS / 1000 && Date.now() - endedAt < SETTLE_MS; i++) {
      await sleep(1000);
      add(await api(`/v1/jobs/${jobId}/logs?since=${next}&limit=${LOG_PAGE}`));
    }
    if (!lines) pre.replaceChildren(el("span", { class: "log-empty" }, text));
    pre.dataset.state = "complete";
  }

  async function followLog() {
    pre.dataset.state = "following";
    if (!lines) pre.replaceChildren(el("span", { class: "log-empty" }, "No output yet."));
    const cursor = {}; // the last message's id (its `next`): a reconnect resumes after it
    let ended = false;
    for (;;) {
      try {
        await streamEvents(`/v1/jobs/${jobId}/logs?follow=true&since=0`,
          { log(page) { problem.replaceChildren(); add(page); }, end() { ended = true; } },
          undefined, cursor);
        if (ended) return done("No output.", Date.now());
      } catch (err) {
        if (err.status === 401 || err.status === 404) return done("No output.", -Infinity);
        problem.replaceChildren(notice("error", err.status === 429
          ? "Too many live pages open with this token; close some. Retrying…"
          : `The log stream stopped (${err.message}). Reconnecting…`));
      }
      await sleep(2000); // the server closed the stream early (a restart): reconnect
    }
  }

  async function readLog(finishedAt) {
    for (;;) {
      const page = await api(`/v1/jobs/${jobId}/logs?since=${next}&limit=${LOG_PAGE}`);
      add(page);
      if (page.lines.length < LOG_PAGE) return done("No output.", finishedAt ? parseTime(finishedAt) : -Infinity);
    }
  }

  async function load(live, finishedAt = null) {
    try {
      await (live ? followLog() : readLog(finishedAt));
    } catch (err) {
      if (err.status !== 401) problem.replaceChildren(notice("error", `Could not load the log: ${err.message}`));
    }
  }
  return { node, load };
}

function artifactRow(a) {
  return el("tr", { "data-artifact": a.name },
    el("td", {}, el("a", { href: a.url, download: a.name }, a.name)),
    el("td", { class: "num", title: `${a.size} bytes` }, fmtBytes(a.size)),
    el("td", {}, el("code", { title: a.sha256 }, `${a.sha256.slice(0, 12)}…`)));
}

// The final state first, then each kept checkpoint under a row naming its step.
function artifactTable(data) {
  const steps = [...new Set(data.map((a) => a.step).filter((s) => s !== null))].sort((x, y) => x - y);
  const groups = new Map([null, ...steps].map((step) => [step, []]));
  for (const a of data) groups.get(a.step).push(a);
  const labelled = groups.size > 1;
  return el("div", { class: "table-wrap" },
    el("table", { id: "artifacts-table", class: "artifacts" },
      el("thead", {}, el("tr", {}, el("th", {}, "name"), el("th", { class: "num" }, "size"), el("th", {}, "sha256"))),
      [...groups].filter(([, rows]) => rows.length).map(([step, rows]) =>
        el("tbody", { "data-step": step ?? "final" },
          labelled ? el("tr", { class: "group" }, el("th", { colspan: 3 },
            step === null ? "Final" : `Checkpoint at step ${step}`)) : null,
          rows.map(artifactRow)))));
}

// The "Artifacts" card. `load(live)` lists them again; deletion is offered once the job has
// ended (not live), to a token that may delete them (`deletable`: its owner's or an admin's).
export function artifactsPanel(jobId, { deletable = false } = {}) {
  const box = el("div", { id: "artifacts" }, el("p", { class: "loading" }, "Loading…"));
  const node = el("div", { class: "card" }, el("h2", {}, "Artifacts"), box);
  let live = true;
  let refresh = null;
  let latest = 0; // an older listing that answers late is dropped

  async function remove(data, button) {
    const total = data.reduce((n, a) => n + a.size, 0);
    if (!confirm(`Delete the ${data.length} artifacts of job #${jobId} (${fmtBytes(total)})? `
      + "Its log and metrics stay.")) return;
    button.disabled = true;
    try {
      await api(`/v1/jobs/${jobId}/artifacts`, { method: "DELETE" });
    } catch (err) {
      box.append(actionFailed("Delete", err));
      button.disabled = false;
      return;
    }
    await load();
  }

  async function load(isLive = live) {
    live = isLive;
    clearTimeout(refresh);
    const seq = ++latest;
    let listing;
    try {
      listing = await api(`/v1/jobs/${jobId}/artifacts`);
    } catch (err) {
      if (seq === latest && err.status !== 401) box.replaceChildren(notice("error", `Could not list the artifacts: ${err.message}`));
      return;
    }
    if (seq !== latest) return;
    const { data } = listing;
    if (listing.deleted_at) {
      box.replaceChildren(notice("empty", `Artifacts deleted at ${fmtTime(listing.deleted_at)}.`));
      return;
    }
    if (!data.length) {
      box.replaceChildren(notice("empty", live ? "No artifacts yet." : "This job left no artifacts."));
      return;
    }
    box.replaceChildren(artifactTable(data));
    if (!live && deletable) {
      const button = el("button", {
        id: "delete-artifacts", class: "danger", type: "button", onclick: () => remove(data, button),
      }, "Delete artifacts");
      box.append(el("div", { class: "actions" }, button));
    }
    refresh = setTimeout(() => load(), LINK_REFRESH_MS);
  }
  return { node, load };
}
