// "/sweeps/{id}": trials' curves by optimizer, final metric against batch size per optimizer,
// parallel coordinates of the varied parameters, a sortable trials table; its owner, and a cancel
// button for a token that may use it.
import { actionFailed, api, badge, can, colorFor, el, fmt, fmtBatch, layout, loadPlotly, me, notice, optimizerLabel, PLOT_CONFIG, start } from "./nestor.js";

const REFRESH_MS = 5000;
const CURVE_POINTS = 500;
const sweepId = Number(location.pathname.split("/").pop());
const higherIsBetter = (metric) => /acc/.test(metric);

function trialLabel(t) {
  return `#${t.job_id} ${optimizerLabel(t.spec)} b=${t.spec.batch_size} lr=${fmt(t.spec.optimizer.lr, 3)}`;
}

function best(values, metric) {
  const ok = values.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  if (!ok.length) return null;
  return higherIsBetter(metric) ? Math.max(...ok) : Math.min(...ok);
}

// One trace per optimizer: for each batch size, the best final value over that optimizer's
// trials at that batch size (a sweep with a learning-rate search has several).
export function batchComparison(trials, metric) {
  const byOpt = new Map();
  for (const t of trials) {
    const v = t.final[metric];
    if (v === null || v === undefined) continue;
    const opt = optimizerLabel(t.spec);
    if (!byOpt.has(opt)) byOpt.set(opt, new Map());
    const m = byOpt.get(opt);
    m.set(t.spec.batch_size, [...(m.get(t.spec.batch_size) || []), v]);
  }
  return [...byOpt.entries()].sort().map(([opt, m]) => {
    const sizes = [...m.keys()].sort((a, b) => a - b);
    return {
      x: sizes, y: sizes.map((b) => best(m.get(b), metric)), name: opt, type: "scatter",
      mode: "lines+markers", line: { color: colorFor(opt) }, marker: { size: 9 },
    };
  });
}

// Steps to the target at each cell's best lr against batch size, one trace per optimizer
// (log-log), with the perfect-scaling line (steps halve when the batch doubles) from the
// smallest batch of the fastest optimizer there.
export function stepsComparison(cells) {
  const byOpt = new Map();
  for (const c of cells) {
    if (c.steps_to_target === null) continue;
    if (!byOpt.has(c.optimizer)) byOpt.set(c.optimizer, []);
    byOpt.get(c.optimizer).push(c);
  }
  const traces = [...byOpt.entries()].sort().map(([opt, cs]) => {
    cs.sort((a, b) => a.batch_size - b.batch_size);
    return {
      x: cs.map((c) => c.batch_size), y: cs.map((c) => c.steps_to_target), name: opt,
      type: "scatter", mode: "lines+markers", line: { color: colorFor(opt) }, marker: { size: 9 },
      text: cs.map((c) => `best lr ${fmt(c.best_lr, 3)}`),
      hovertemplate: `${opt}<br>batch %{x}: %{y} steps, %{text}<extra></extra>`,
    };
  });
  const reached = cells.filter((c) => c.steps_to_target !== null);
  if (reached.length) {
    const b0 = Math.min(...reached.map((c) => c.batch_size));
    const s0 = Math.min(...reached.filter((c) => c.batch_size === b0).map((c) => c.steps_to_target));
    const sizes = [...new Set(cells.map((c) => c.batch_size))].sort((a, b) => a - b);
    traces.push({
      x: sizes, y: sizes.map((b) => (s0 * b0) / b), name: "perfect scaling", type: "scatter",
      mode: "lines", line: { color: "#888", dash: "dot" }, hoverinfo: "skip",
    });
  }
  return traces;
}

function cellsTable(cells) {
  const opts = [...new Set(cells.map((c) => c.optimizer))];
  const sizes = [...new Set(cells.map((c) => c.batch_size))].sort((a, b) => a - b);
  const cell = (opt, b) => {
    const c = cells.find((x) => x.optimizer === opt && x.batch_size === b);
    if (!c) return el("td", {}, "–");
    const pending = c.lrs.some((r) => r.unfinished);
    const text = c.steps_to_target === null ? (pending ? "…" : "not reached")
      : `${c.steps_to_target} (lr ${fmt(c.best_lr, 3)}${c.best_on_edge ? ", grid edge" : ""})`;
    return el("td", { class: "num", "data-cell": `${opt}|${b}` }, text);
  };
  return el("div", { class: "table-wrap" }, el("table", { id: "cells-table" },
    el("thead", {}, el("tr", {}, el("th", {}, "optimizer"), sizes.map((b) => el("th", {}, fmtBatch(b))))),
    el("tbody", {}, opts.map((opt) => el("tr", {}, el("td", {}, opt), sizes.map((b) => cell(opt, b)))))));
}

function parcoords(trials, varied, metric) {
  const dims = varied.map((key) => {
    const raw = trials.map((t) => t.varied[key]);
    if (raw.every((v) => typeof v === "number")) {
      const log = /(^|\.)lr$|weight_decay|eps/.test(key) && raw.every((v) => v > 0);
      return { label: log ? `log10 ${key}` : key, values: raw.map((v) => (log ? Math.log10(v) : v)) };
    }
    const cats = [...new Set(raw.map((v) => fmt(v)))];
    return { label: key, values: raw.map((v) => cats.indexOf(fmt(v))), tickvals: cats.map((_, i) => i), ticktext: cats };
  });
  const y = trials.map((t) => t.final[metric] ?? NaN);
  dims.push({ label: metric, values: y });
  return [{
    type: "parcoords", dimensions: dims,
    line: { color: y, colorscale: "Viridis", reversescale: !higherIsBetter(metric), showscale: true },
  }];
}

start(async (main) => {
  const head = el("h1", {}, `Sweep #${sweepId}`);
  const statusSlot = el("span", { id: "status" });
  const owner = el("span", { class: "muted", id: "owner" });
  const cancelBtn = el("button", { id: "cancel", class: "danger", type: "button", hidden: true }, "Cancel sweep");
  const metricSel = el("select", { id: "metric", "aria-label": "metric" });
  const message = el("div", { id: "message" });
  const tableBox = el("div", { id: "trials" }, el("p", { class: "loading" }, "Loading trials…"));
  const chart = (id, cls = "chart tall") => el("div", { class: "card" }, el("div", { class: cls, id }));
  main.replaceChildren(
    head,
    el("div", { class: "filters" }, statusSlot, owner, el("label", {}, "Metric ", metricSel), cancelBtn,
      el("span", { class: "muted", id: "updated" })),
    message,
    el("div", { class: "grid" }, chart("chart-batch"), chart("chart-curves")),
    el("section", { id: "targets", hidden: true }, el("h2", {}, "Steps to the target"),
      el("p", { class: "muted", id: "target-line" }), el("div", { id: "cells" }), chart("chart-steps")),
    el("h2", {}, "Trials"), tableBox,
    el("h2", {}, "Parameters against the metric"), chart("chart-params"),
  );

  let sortKey = null;
  let sortDir = 1;
  let curvesFor = null; // (metric, trials and their steps) the curves were drawn for
  let curvesSeq = 0;
  let detail;
  let trials = [];

  function table(varied, metrics) {
    const cols = [["job", (t) => t.job_id], ["status", (t) => t.status],
      ...varied.map((k) => [k, (t) => t.varied[k]]),
      ...(varied.includes("optimizer") ? [] : [["optimizer", (t) => optimizerLabel(t.spec)]]),
      ...(varied.includes("batch_size") ? [] : [["batch", (t) => t.spec.batch_size]]),
      ["steps", (t) => t.last_step],
      ...(detail.cells ? [["reached at", (t) => t.reached_target_at_step ?? null]] : []),
      ...metrics.map((m) => [m, (t) => t.final[m] ?? null])];
    const rows = [...trials];
    if (sortKey !== null) {
      const get = cols.find((c) => c[0] === sortKey)[1];
      const key = (t) => { const v = get(t); return v !== null && typeof v === "object" ? fmt(v) : v; };
      rows.sort((a, b) => {
        const x = key(a); const y = key(b);
        if (x === null) return 1; if (y === null) return -1;
        return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
      });
    }
    const header = el("tr", {}, cols.map(([name]) => el("th", {
      class: `sortable${name === sortKey ? (sortDir > 0 ? " sorted-asc" : " sorted-desc") : ""}`,
      "data-key": name,
      onclick: () => { sortDir = sortKey === name ? -sortDir : 1; sortKey = name; draw(); },
    }, name)));
    const body = rows.map((t) => el("tr", { "data-job": t.job_id }, cols.map(([name, get]) => {
      const v = get(t);
      if (name === "job") return el("td", {}, el("a", { href: `/jobs/${v}` }, `#${v}`));
      if (name === "status") return el("td", {}, badge(v));
      return el("td", { class: typeof v === "number" ? "num" : "" }, fmt(v));
    })));
    return el("div", { class: "table-wrap" }, el("table", { id: "trials-table" }, el("thead", {}, header), el("tbody", {}, body)));
  }

  async function drawCurves(metric) {
    const done = trials.filter((t) => t.last_step > 0);
    const key = `${metric}|${done.map((t) => `${t.job_id}:${t.last_step}`).join(",")}`;
    if (key === curvesFor) return;
    curvesFor = key;
    const seq = ++curvesSeq;
    let series;
    try {
      series = await Promise.all(done.map((t) => api(`/v1/jobs/${t.job_id}/metrics?keys=${metric}&max_points=${CURVE_POINTS}`)));
    } catch (err) {
      curvesFor = null; // try again on the next draw
      throw err;
    }
    if (seq !== curvesSeq) return; // a newer draw (another metric) has started
    const shown = new Set();
    const traces = done.map((t, i) => {
      const s = series[i].series[metric] || { step: [], value: [] };
      const opt = optimizerLabel(t.spec);
      const first = !shown.has(opt);
      shown.add(opt);
      return {
        x: s.step, y: s.value, type: "scatter", mode: "lines", name: opt, legendgroup: opt,
        showlegend: first, line: { color: colorFor(opt), width: 1.5 },
        hovertemplate: `${trialLabel(t)}<br>step %{x}: %{y:.4g}<extra></extra>`,
      };
    });
    await Plotly.react("chart-curves", traces, layout(`${metric} of every trial, by optimizer`, { hovermode: "closest" }), PLOT_CONFIG);
  }

  async function draw() {
    const metric = metricSel.value;
    const varied = Object.keys(detail.spec.space || {});
    const metrics = [...new Set(trials.flatMap((t) => Object.keys(t.final)))]
      .filter((m) => /^(val_|train_loss)/.test(m)).sort();
    tableBox.replaceChildren(trials.length ? table(varied, metrics) : notice("empty", "This sweep has no trials."));
    const comparison = batchComparison(trials, metric);
    const sizes = [...new Set(trials.map((t) => t.spec.batch_size))].sort((a, b) => a - b);
    await Plotly.react("chart-batch", comparison, layout(`final ${metric} against batch size`, {
      xaxis: { title: { text: "global batch size" }, type: "log", tickvals: sizes, ticktext: sizes.map(fmtBatch) },
      yaxis: { title: { text: metric } }, hovermode: "closest",
    }), PLOT_CONFIG);
    if (varied.length) await Plotly.react("chart-params", parcoords(trials, varied, metric), { margin: { l: 150, r: 80, t: 50, b: 30 } }, PLOT_CONFIG);
    if (detail.cells) {
      const target = trials.find((t) => t.spec.stop_at)?.spec.stop_at;
      document.getElementById("targets").hidden = false;
      document.getElementById("target-line").textContent = `Steps until ${target.metric} ${target.mode === "max" ? "≥" : "≤"} ${target.value}, at each cell's best lr (the median over seeds; a cell counts an lr only when every seed reached the target).`;
      document.getElementById("cells").replaceChildren(cellsTable(detail.cells));
      const steps = stepsComparison(detail.cells);
      const sizes = [...new Set(detail.cells.map((c) => c.batch_size))].sort((a, b) => a - b);
      await Plotly.react("chart-steps", steps, layout("steps to the target against batch size", {
        xaxis: { title: { text: "global batch size" }, type: "log", tickvals: sizes, ticktext: sizes.map(fmtBatch) },
        yaxis: { title: { text: "steps" }, type: "log" }, hovermode: "closest",
      }), PLOT_CONFIG);
    }
    await drawCurves(metric);
  }

  async function load() {
    const [d, jobs, who] = await Promise.all([
      api(`/v1/sweeps/${sweepId}`), api(`/v1/jobs?sweep=${sweepId}&limit=1000`), me(), loadPlotly(),
    ]);
    detail = d;
    const specs = new Map(jobs.data.map((j) => [j.id, j.spec]));
    trials = d.trials_summary.map((t) => ({ ...t, spec: specs.get(t.job_id) }));
    head.textContent = `Sweep #${d.id} ${d.name}`;
    document.title = `Nestor — sweep #${d.id} ${d.name}`;
    statusSlot.replaceChildren(badge(d.status));
    owner.textContent = `submitted by ${d.owner ?? "–"}`;
    cancelBtn.hidden = !can(who, "cancel", d.owner);
    cancelBtn.disabled = d.status !== "running";
    const keys = [...new Set(trials.flatMap((t) => Object.keys(t.final)))]
      .filter((k) => /^(val_|train_loss)/.test(k)).sort();
    const wanted = metricSel.value || d.spec.early_stopping?.metric
      || (keys.includes("val_accuracy") ? "val_accuracy" : "val_loss");
    metricSel.replaceChildren(...[...new Set([wanted, ...keys])].map((k) => el("option", { value: k }, k)));
    metricSel.value = wanted;
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    await draw();
  }

  metricSel.addEventListener("change", () => draw());
  cancelBtn.addEventListener("click", async () => {
    cancelBtn.disabled = true;
    try { await api(`/v1/sweeps/${sweepId}/cancel`, { method: "POST" }); await load(); } catch (err) {
      cancelBtn.disabled = detail.status !== "running";
      message.replaceChildren(actionFailed("Cancel", err));
    }
  });
  try {
    await load();
  } catch (err) {
    if (err.status === 404) { main.replaceChildren(notice("error", `Sweep ${sweepId} does not exist.`)); return; }
    throw err;
  }
  document.body.dataset.drawn = "true";
  const timer = setInterval(async () => {
    if (detail.status !== "running") { clearInterval(timer); return; }
    try { await load(); message.replaceChildren(); } catch (err) {
      if (err.status !== 401) message.replaceChildren(notice("error", `Could not refresh: ${err.message}`));
    }
  }, REFRESH_MS);
});
