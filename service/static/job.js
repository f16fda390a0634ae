// "/jobs/{id}": spec, status, owner, events, charts, log, artifacts; live over server-sent events
// while it runs. Cancel, retry and artifact deletion are shown only to a token that may use them.
import { actionFailed, api, badge, can, el, fmt, fmtTime, hasScope, layout, loadPlotly, me, notice, optimizerLabel, parseTime, PLOT_CONFIG, start, streamEvents, timing, workersLabel } from "./nestor.js";
import { artifactsPanel, logPanel } from "./outputs.js";

const CHARTS = [
  { id: "loss", title: "loss", keys: ["train_loss", "val_loss"] },
  { id: "accuracy", title: "validation accuracy", keys: ["val_accuracy"] },
  { id: "lr", title: "learning rate", keys: ["lr"] },
  { id: "grad_norm", title: "gradient norm (before clipping)", keys: ["grad_norm"] },
  { id: "throughput", title: "samples / s", keys: ["samples_per_s"] },
  // Optional: hidden until a point arrives (tokens: language models; TFLOP/s: once the FLOPs
  // are counted; MFU: on a device whose peak is known, see workers/flops.py).
  { id: "tokens", title: "tokens / s", keys: ["tokens_per_s"], optional: true },
  { id: "flops", title: "achieved TFLOP/s (all workers)", keys: ["tflops"], optional: true },
  { id: "mfu", title: "MFU (per worker, of the device's dense peak)", keys: ["mfu"], optional: true,
    yaxis: { tickformat: ".0%", rangemode: "tozero" } },
  { id: "phases", title: "step time by part (s, host)", keys: ["data_time", "compute_time", "optimizer_time"] },
  // Its title names the state's precision (fp32, bf16, int8): set once the spec is read.
  { id: "state_per_param", title: "optimizer state, bytes per parameter", keys: ["opt_state_bytes_per_param"],
    optional: true, yaxis: { rangemode: "tozero" } },
  { id: "state", title: "optimizer state bytes (this rank)", keys: ["opt_state_bytes"], yaxis: { rangemode: "tozero" } },
];
const MAX_POINTS = 2000;

// The latest throughput figures, above the charts; one with no point yet is left out.
const compact = new Intl.NumberFormat("en", { notation: "compact", maximumSignificantDigits: 3 });
const FIGURES = [
  { key: "mfu", label: "MFU", show: (v) => `${(100 * v).toFixed(v < 0.1 ? 1 : 0)}%` },
  { key: "tflops", label: "TFLOP/s", show: (v) => compact.format(v) },
  { key: "tokens_per_s", label: "tokens / s", show: (v) => compact.format(v) },
  { key: "samples_per_s", label: "samples / s", show: (v) => compact.format(v) },
];
const LIVE = new Set(["queued", "running"]);
const TIMING_REFRESH_MS = 5000;

const jobId = Number(location.pathname.split("/").pop());

// A built-in's name, a factory's import path, or a file data set's path.
const factoryLabel = (v) => (typeof v === "string" ? v : v.name || v.factory || v.path);

function specSummary(job) {
  const s = job.spec;
  const code = [
    ...(s.code ? [["code", s.code.slice(0, 19)]] : []),
    ...(s.precision && s.precision !== "fp32" ? [["precision", s.precision]] : []),
  ];
  return el("dl", { class: "summary" },
    el("div", {}, el("dt", { class: "muted" }, "submitted by"), el("dd", { id: "owner" }, job.owner ?? "–")),
    ...[["model", factoryLabel(s.model)], ["dataset", factoryLabel(s.dataset)], ...code,
      ["optimizer", optimizerLabel(s)],
      ["lr", fmt(s.optimizer.lr)], ["batch size", s.batch_size], ["workers", workersLabel(job)],
      ["ZeRO stage", s.zero_stage], ["steps", `${job.last_step} / ${s.max_steps}`],
      ["started", fmtTime(job.started_at)], ["finished", fmtTime(job.finished_at)]]
      .map(([k, v]) => el("div", {}, el("dt", { class: "muted" }, k), el("dd", {}, v))));
}

start(async (main) => {
  // Everything the page needs is requested at once; the slowest is the metrics request.
  // One request per chart: the server computes them in parallel, and the slowest series
  // (the per-step loss of a long run) does not hold up the others.
  const metricsLoading = Promise.all(CHARTS.map((c) =>
    api(`/v1/jobs/${jobId}/metrics?keys=${c.keys.join(",")}&max_points=${MAX_POINTS}`)))
    .then((parts) => ({ series: Object.assign({}, ...parts.map((p) => p.series)) }));
  const historyLoading = api(`/v1/jobs/${jobId}/events/history`);
  metricsLoading.catch(() => {}); historyLoading.catch(() => {}); // awaited below
  const plotlyLoading = loadPlotly();
  const whoLoading = me();
  whoLoading.catch(() => {}); // awaited below
  let job = await api(`/v1/jobs/${jobId}`).catch((err) => {
    main.replaceChildren(notice("error", err.status === 404 ? `Job ${jobId} does not exist.` : err.message));
    return null;
  });
  if (!job) return;
  const who = await whoLoading;
  // Retrying a job that runs a code package also needs "code" (the service checks both).
  const mayRetry = can(who, "retry", job.owner) && (!job.spec.code || hasScope(who, "code"));
  document.title = `Nestor — #${job.id} ${job.name}`;
  const precision = job.spec.optimizer.state_precision || "fp32";
  CHARTS.find((c) => c.id === "state_per_param").title =
    `optimizer state (${precision}), bytes per parameter`;
  const statusSlot = el("span", { id: "status" }, badge(job.status));
  const cancelBtn = el("button", {
    id: "cancel", class: "danger", type: "button", hidden: !can(who, "cancel", job.owner),
  }, "Cancel job");
  const retryBtn = el("button", { id: "retry", type: "button", hidden: !mayRetry }, "Retry");
  // An elastic job's size, changed by hand while it runs (its owner or an admin).
  const range = typeof job.spec.num_workers === "object" ? job.spec.num_workers : null;
  const resizeInput = el("input", {
    id: "resize-workers", type: "number", min: range?.min, max: range?.max, step: 1,
    value: job.workers ?? range?.min, "aria-label": "workers",
  });
  const resizeBtn = el("button", { id: "resize", type: "button" }, "Resize");
  const resizeForm = el("span", { class: "resize", hidden: !range || !can(who, "cancel", job.owner) },
    resizeInput, resizeBtn);
  const message = el("div", { id: "message" });
  const summary = el("div", { id: "summary" }, specSummary(job));
  const events = el("ol", { class: "events", id: "events" });
  const figures = el("dl", { class: "figures", id: "pace", hidden: true });
  const charts = el("div", { class: "grid", id: "charts" },
    CHARTS.map((c) => el("div", { class: "card", id: `card-${c.id}`, hidden: c.optional },
      el("div", { class: "chart", id: `chart-${c.id}` }, el("p", { class: "loading" }, "Loading…")))));
  const log = logPanel(jobId);
  const artifacts = artifactsPanel(jobId, { deletable: can(who, "delete", job.owner) });
  main.replaceChildren(
    el("h1", {}, `#${job.id} ${job.name} `, statusSlot),
    el("div", { class: "actions" }, cancelBtn, retryBtn, resizeForm,
      job.sweep_id ? el("a", { href: `/sweeps/${job.sweep_id}` }, `part of sweep #${job.sweep_id}`) : null),
    message,
    figures,
    charts,
    el("div", { class: "row" },
      el("div", { class: "card" }, el("h2", {}, "Run"), summary),
      el("div", { class: "card" }, el("h2", {}, "Events"), events),
      el("div", { class: "card" }, el("h2", {}, "Spec"), el("pre", { id: "spec" }, JSON.stringify(job.spec, null, 2)))),
    el("div", { class: "row" }, log.node, artifacts.node),
  );
  log.load(LIVE.has(job.status), job.finished_at); // both run on their own, beside the charts
  artifacts.load(LIVE.has(job.status));

  function showJob(next) {
    job = next;
    statusSlot.replaceChildren(badge(job.status));
    summary.replaceChildren(specSummary(job));
    cancelBtn.disabled = !LIVE.has(job.status);
    resizeBtn.disabled = job.status !== "running";
    retryBtn.disabled = LIVE.has(job.status);
    const why = job.error || job.stop_reason || timing(job);
    message.replaceChildren(why ? notice(job.status === "failed" ? "error" : "empty", why) : "");
  }
  const latest = {}; // key -> {step, value}: the figures' values
  function noteLatest(key, step, value) {
    if (typeof value === "number" && Number.isFinite(value) && step >= (latest[key]?.step ?? -1)) {
      latest[key] = { step, value };
    }
  }
  function showFigures() {
    const shown = FIGURES.filter((f) => latest[f.key]).map((f) =>
      el("div", { "data-key": f.key, title: `at step ${latest[f.key].step}` },
        el("dt", { class: "muted" }, f.label), el("dd", {}, f.show(latest[f.key].value))));
    figures.replaceChildren(...shown);
    figures.hidden = shown.length === 0;
  }
  function addEvent(e) {
    events.append(el("li", {}, badge(e.status), ` ${fmtTime(e.time)} `, el("span", { class: "muted" }, e.reason || "")));
  }
  showJob(job);
  // The place in the queue and the estimates move with the queue and the job's rate.
  const timingTimer = setInterval(() => {
    if (!LIVE.has(job.status)) { clearInterval(timingTimer); return; }
    api(`/v1/jobs/${jobId}`).then(showJob).catch(() => {}); // the next tick tries again
  }, TIMING_REFRESH_MS);
  cancelBtn.addEventListener("click", async () => {
    cancelBtn.disabled = true;
    try { showJob(await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" })); } catch (err) {
      showJob(job);
      message.replaceChildren(actionFailed("Cancel", err));
    }
  });
  resizeBtn.addEventListener("click", async () => {
    resizeBtn.disabled = true;
    try {
      showJob(await api(`/v1/jobs/${jobId}`, { method: "PATCH", body: { num_workers: Number(resizeInput.value) } }));
      message.replaceChildren(notice("empty", `Asked to go on with ${resizeInput.value} workers from the next step.`));
    } catch (err) {
      showJob(job);
      message.replaceChildren(actionFailed("Resize", err));
    }
  });
  retryBtn.addEventListener("click", async () => {
    try { location.href = `/jobs/${(await api(`/v1/jobs/${jobId}/retry`, { method: "POST" })).id}`; } catch (err) {
      message.replaceChildren(actionFailed("Retry", err));
    }
  });

  const [history, metrics] = await Promise.all([historyLoading, metricsLoading, plotlyLoading]);
  history.forEach(addEvent);
  let lastEventTime = history.length ? parseTime(history[history.length - 1].time) : -Infinity;

  // A long series comes back downsampled (each bucket's extremes), so its last point need not
  // be its latest: the figures also ask for whatever follows the last point of each.
  const figureKeys = FIGURES.map((f) => f.key).filter((k) => metrics.series[k]?.step.length);
  for (const k of figureKeys) {
    const s = metrics.series[k];
    noteLatest(k, s.step[s.step.length - 1], s.value[s.value.length - 1]);
  }
  showFigures();
  if (figureKeys.length) {
    const after = Math.min(...figureKeys.map((k) => latest[k]?.step ?? 0));
    api(`/v1/jobs/${jobId}/metrics?keys=${figureKeys.join(",")}&since_step=${after}&max_points=${MAX_POINTS}`)
      .then((tail) => {
        for (const [k, s] of Object.entries(tail.series)) {
          s.step.forEach((step, i) => noteLatest(k, step, s.value[i]));
        }
        showFigures();
      }).catch(() => {}); // the figures keep what the charts had
  }

  // One trace per key, in CHARTS order; traceOf[key] = [div, index].
  // Each series was read at its own moment: remember each one's last step, stream from the
  // earliest of them and drop what a series already has.
  const traceOf = {};
  const lastStepOf = {};
  await Promise.all(CHARTS.map((c) => {
    const div = document.getElementById(`chart-${c.id}`);
    div.replaceChildren();
    const traces = c.keys.map((key, i) => {
      traceOf[key] = [div, i];
      const s = metrics.series[key] || { step: [], value: [] };
      lastStepOf[key] = s.step.length ? s.step[s.step.length - 1] : 0;
      return { x: s.step, y: s.value, name: key, mode: key.startsWith("val_") ? "lines+markers" : "lines", type: "scatter" };
    });
    if (c.optional) div.parentElement.hidden = !traces.some((t) => t.x.length);
    return Plotly.newPlot(div, traces, layout(c.title, c.yaxis ? { yaxis: c.yaxis } : {}), PLOT_CONFIG);
  }));
  document.body.dataset.drawn = "true";
  performance.mark("nestor:charts-drawn");

  // Live: append new points in batches (at most a few redraws per second).
  let pending = {};
  let flushing = false;
  function flush() {
    flushing = false;
    const byDiv = new Map();
    for (const [key, pts] of Object.entries(pending)) {
      const [div, index] = traceOf[key];
      if (!byDiv.has(div)) byDiv.set(div, { x: [], y: [], idx: [] });
      const b = byDiv.get(div);
      b.x.push(pts.map((p) => p.step)); b.y.push(pts.map((p) => p.value)); b.idx.push(index);
      for (const p of pts) noteLatest(key, p.step, p.value);
    }
    pending = {};
    for (const [div, b] of byDiv) {
      Plotly.extendTraces(div, { x: b.x, y: b.y }, b.idx);
      const card = div.parentElement;
      if (card.hidden) { // an optional chart's first points: drawn while hidden, sized now
        card.hidden = false;
        Plotly.Plots.resize(div);
      }
    }
    showFigures();
  }
  const handlers = {
    metrics(points) {
      for (const p of points) {
        if (!(p.key in traceOf) || p.step <= lastStepOf[p.key]) continue;
        (pending[p.key] ||= []).push(p);
        lastStepOf[p.key] = p.step;
      }
      if (!flushing) { flushing = true; setTimeout(flush, 300); }
    },
    status(e) {
      if (parseTime(e.time) <= lastEventTime) return; // already listed from the history
      lastEventTime = parseTime(e.time);
      addEvent(e);
      api(`/v1/jobs/${jobId}`).then(showJob);
    },
    end() {
      api(`/v1/jobs/${jobId}`).then((ended) => {
        showJob(ended);
        artifacts.load(LIVE.has(ended.status)); // the final model, result.json, metrics.csv
      });
    },
  };
  const cursor = {}; // the last message's id: a reconnect resumes after it
  while (LIVE.has(job.status)) {
    try {
      const since = Math.min(...Object.values(lastStepOf).filter((v) => v > 0), Infinity);
      await streamEvents(`/v1/jobs/${jobId}/events?since_step=${Number.isFinite(since) ? since : 0}`,
        handlers, undefined, cursor);
      break; // the server closed the stream: the job has ended
    } catch (err) {
      if (err.status === 401 || err.status === 404) break;
      if (err.status === 429) message.replaceChildren(notice("error", "Too many live pages open with this token; close some. Retrying…"));
      await new Promise((r) => setTimeout(r, 2000)); // server restarting: reconnect
      job = await api(`/v1/jobs/${jobId}`).catch(() => job);
    }
  }
});
