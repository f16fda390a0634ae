// "/": jobs and sweeps with their owners, filtered (status, text, mine only), refreshed every
// few seconds.
import { api, badge, el, fmt, fmtIn, fmtTime, notice, optimizerLabel, start, timing, workersLabel } from "./nestor.js";

const REFRESH_MS = 2000;
const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled", "stopped_early"];

function progress(job) {
  const total = job.spec.max_steps || 1;
  const pct = Math.min(100, (100 * job.last_step) / total);
  return el("span", { title: timing(job) ?? `${job.last_step} / ${total} steps` },
    el("span", { class: "progress" }, el("span", { style: `width:${pct.toFixed(1)}%` })),
    ` ${job.last_step}/${total}`, when(job));
}

// The short form of timing(job): "#2, ~40 s" for a queued job, "~12 min left" running.
function when(job) {
  let text = null;
  if (job.status === "queued" && job.queue_position) {
    text = `#${job.queue_position}` + (job.estimated_start ? `, starts in ~${fmtIn(job.estimated_start)}` : "");
  } else if (job.status === "running" && job.estimated_end) {
    text = `~${fmtIn(job.estimated_end)} left`;
  }
  return text ? el("span", { class: "muted when" }, ` ${text}`) : null;
}

function jobRow(job) {
  return el("tr", { "data-job": job.id },
    el("td", {}, el("a", { href: `/jobs/${job.id}` }, `#${job.id}`)),
    el("td", {}, job.name),
    el("td", { class: "owner" }, job.owner ?? "–"),
    el("td", { title: timing(job) }, badge(job.status)),
    el("td", {}, optimizerLabel(job.spec)),
    el("td", { class: "num" }, job.spec.batch_size),
    el("td", { class: "num" }, workersLabel(job)),
    el("td", {}, progress(job)),
    el("td", { class: "num" }, fmt(job.latest.train_loss)),
    el("td", { class: "num" }, fmt(job.latest.val_accuracy)),
    el("td", {}, job.sweep_id ? el("a", { href: `/sweeps/${job.sweep_id}` }, `sweep #${job.sweep_id}`) : "–"),
    el("td", { class: "muted" }, fmtTime(job.created_at)),
  );
}

function sweepRow(sweep) {
  return el("tr", { "data-sweep": sweep.id },
    el("td", {}, el("a", { href: `/sweeps/${sweep.id}` }, `#${sweep.id}`)),
    el("td", {}, sweep.name),
    el("td", { class: "owner" }, sweep.owner ?? "–"),
    el("td", {}, badge(sweep.status)),
    el("td", { class: "num" }, sweep.trials),
    el("td", {}, sweep.spec.search || "grid"),
    el("td", {}, Object.keys(sweep.spec.space || {}).join(", ")),
    el("td", {}, sweep.spec.early_stopping ? `ASHA on ${sweep.spec.early_stopping.metric}` : "–"),
  );
}

function table(id, headers, rows) {
  return el("div", { class: "table-wrap" },
    el("table", { id },
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows)));
}

start(async (main) => {
  const status = el("select", { id: "filter-status", "aria-label": "status" },
    STATUSES.map((s) => el("option", { value: s }, s ? s.replace("_", " ") : "any status")));
  const text = el("input", { id: "filter-text", type: "search", placeholder: "name or optimizer" });
  const mine = el("input", { id: "mine", type: "checkbox" });
  const jobsBox = el("section", { id: "jobs" }, el("p", { class: "loading" }, "Loading jobs…"));
  const sweepsBox = el("section", { id: "sweeps" }, el("p", { class: "loading" }, "Loading sweeps…"));
  const errorBox = el("div", { id: "errors" });
  main.replaceChildren(
    el("h1", {}, "Runs"),
    el("div", { class: "filters" }, el("label", {}, "Status ", status), text,
      el("label", {}, mine, " mine only"),
      el("span", { class: "muted", id: "updated" })),
    errorBox,
    el("h2", {}, "Sweeps"), sweepsBox,
    el("h2", {}, "Jobs"), jobsBox,
  );

  let latest = 0; // responses to an older refresh (filters typed since) are dropped
  async function refresh() {
    const seq = ++latest;
    const params = new URLSearchParams({ limit: "200" });
    const sweepParams = new URLSearchParams({ limit: "100" });
    if (status.value) params.set("status", status.value);
    if (mine.checked) for (const p of [params, sweepParams]) p.set("owner", "me");
    const needle = text.value.trim().toLowerCase();
    try {
      const [jobs, sweeps] = await Promise.all([api(`/v1/jobs?${params}`), api(`/v1/sweeps?${sweepParams}`)]);
      if (seq !== latest) return;
      const jobRows = jobs.data.filter((j) => !needle
        || j.name.toLowerCase().includes(needle) || optimizerLabel(j.spec).includes(needle));
      const sweepRows = sweeps.data.filter((s) => (!status.value || s.status === status.value)
        && (!needle || s.name.toLowerCase().includes(needle)));
      jobsBox.replaceChildren(jobRows.length
        ? table("jobs-table", ["id", "name", "owner", "status", "optimizer", "batch", "workers", "progress",
          "train loss", "val acc", "sweep", "submitted"], jobRows.map(jobRow))
        : notice("empty", jobs.count || needle || status.value || mine.checked
          ? "No job matches these filters."
          : "No jobs yet. Submit one: nestor submit examples/mnist1d-adan-32k.json"));
      sweepsBox.replaceChildren(sweepRows.length
        ? table("sweeps-table", ["id", "name", "owner", "status", "trials", "search", "varies", "early stopping"],
          sweepRows.map(sweepRow))
        : notice("empty", sweeps.count || mine.checked ? "No sweep matches these filters."
          : "No sweeps yet. Start one: nestor sweep examples/sweep-large-batch-small.json"));
      errorBox.replaceChildren();
      document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (err.status !== 401) errorBox.replaceChildren(notice("error", `Could not refresh: ${err.message}`));
    }
  }
  status.addEventListener("change", refresh);
  text.addEventListener("input", refresh);
  mine.addEventListener("change", refresh);
  await refresh();
  setInterval(refresh, REFRESH_MS);
});
