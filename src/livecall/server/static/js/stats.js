// The owner's charts: calls per day (answered and missed), by hour and weekday, outcomes;
// and, under "Technical figures", latency, lengths and end reasons. Every chart has the same
// figures as a table beside it (rendered by the server), for screen readers and small screens.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("stats-data").textContent);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const C = {
    ok: color("--ok"), danger: color("--danger"), accent: color("--accent"),
    warn: color("--warn"), agent: color("--agent"), caller: color("--caller"), muted: color("--muted"),
  };
  Chart.defaults.color = C.muted;
  Chart.defaults.borderColor = color("--line");
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;

  const days = data.days.map((d) => d.label);
  const round = (v) => (v === null || v === undefined ? null : Math.round(v));
  const count = { beginAtZero: true, ticks: { precision: 0 } };
  const charts = {};
  const chart = (id, config) => {
    const canvas = document.getElementById(id);
    if (!canvas) return; // an empty range draws no owner charts
    charts[id] = new Chart(canvas, config);
    canvas.dataset.ready = "1";
  };
  const bars = (labels, values, colour, label) => ({
    type: "bar",
    data: { labels, datasets: [{ label, data: values, backgroundColor: colour }] },
    options: { plugins: { legend: { display: false } }, scales: { y: count } },
  });

  chart("chart-calls", {
    type: "bar",
    data: {
      labels: days,
      datasets: [
        { label: "answered", data: data.days.map((d) => d.answered), backgroundColor: C.ok },
        { label: "missed", data: data.days.map((d) => d.missed), backgroundColor: C.danger },
      ],
    },
    options: { scales: { x: { stacked: true }, y: { ...count, stacked: true } } },
  });
  chart("chart-hours", bars(data.hour_labels, data.hours, C.accent, "calls"));
  chart("chart-weekdays", bars(data.weekday_labels.map((d) => d.slice(0, 3)), data.weekdays, C.caller, "calls"));
  const outcomeNames = { answered: "Answered", abandoned: "Abandoned", failed: "Failed", in_progress: "In progress" };
  const outcomeColours = { answered: C.ok, abandoned: C.warn, failed: C.danger, in_progress: C.accent };
  const outcomes = Object.entries(data.outcomes);
  chart("chart-outcomes", {
    type: "bar",
    data: {
      labels: outcomes.map(([k]) => outcomeNames[k] || k),
      datasets: [{ label: "calls", data: outcomes.map(([, n]) => n), backgroundColor: outcomes.map(([k]) => outcomeColours[k] || C.muted) }],
    },
    options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: count } },
  });

  chart("chart-latency-days", {
    type: "line",
    data: {
      labels: days,
      datasets: [{ label: "mean", data: data.days.map((d) => round(d.mean_latency_ms)), borderColor: C.accent, backgroundColor: C.accent, spanGaps: true }],
    },
    options: { scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } } } },
  });
  const pcts = ["p50", "p90", "p95", "p99"];
  const o = data.overall;
  chart("chart-percentiles", {
    type: "bar",
    data: {
      labels: pcts,
      datasets: [
        { label: "agent reply", data: pcts.map((p) => round(o.first_audio_latency_ms[p])), backgroundColor: C.agent },
        { label: "first answer", data: pcts.map((p) => round(o.answer_ms[p])), backgroundColor: C.caller },
        { label: "barge-in stop", data: pcts.map((p) => round(o.barge_in_stop_ms[p])), backgroundColor: C.warn },
      ],
    },
    options: { scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } } } },
  });
  const buckets = [
    ["< 30 s", 0, 30], ["30–60 s", 30, 60], ["1–2 min", 60, 120], ["2–5 min", 120, 300],
    ["5–10 min", 300, 600], ["10+ min", 600, Infinity],
  ];
  chart("chart-durations", bars(
    buckets.map((b) => b[0]),
    buckets.map(([, lo, hi]) => data.durations.filter((s) => s >= lo && s < hi).length),
    C.accent, "calls",
  ));
  const reasons = Object.entries(o.by_end_reason).sort((a, b) => b[1] - a[1]);
  chart("chart-reasons", {
    type: "bar",
    data: { labels: reasons.map(([r]) => r.replaceAll("_", " ")), datasets: [{ label: "calls", data: reasons.map(([, n]) => n), backgroundColor: C.agent }] },
    options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: count } },
  });
  window.livecallCharts = charts;
})();
