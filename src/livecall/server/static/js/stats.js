// Statistics as charts: calls per day, latency per day and percentiles, durations, end reasons.
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

  const days = data.days.map((d) => d.day.slice(5)); // MM-DD
  const round = (v) => (v === null || v === undefined ? null : Math.round(v));
  const charts = {};
  const chart = (id, config) => {
    const canvas = document.getElementById(id);
    charts[id] = new Chart(canvas, config);
    canvas.dataset.ready = "1";
  };

  chart("chart-calls", {
    type: "bar",
    data: {
      labels: days,
      datasets: [
        { label: "completed", data: data.days.map((d) => d.by_status.completed || 0), backgroundColor: C.ok },
        { label: "failed", data: data.days.map((d) => d.by_status.failed || 0), backgroundColor: C.danger },
        { label: "in progress", data: data.days.map((d) => d.by_status.in_progress || 0), backgroundColor: C.accent },
      ],
    },
    options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } } },
  });

  chart("chart-latency-days", {
    type: "line",
    data: {
      labels: days,
      datasets: [
        { label: "p50", data: data.days.map((d) => round(d.first_audio_latency_ms.p50)), borderColor: C.accent, backgroundColor: C.accent, spanGaps: true },
        { label: "p95", data: data.days.map((d) => round(d.first_audio_latency_ms.p95)), borderColor: C.warn, backgroundColor: C.warn, spanGaps: true },
        { label: "max", data: data.days.map((d) => round(d.first_audio_latency_ms.max)), borderColor: C.danger, backgroundColor: C.danger, borderDash: [4, 4], spanGaps: true },
      ],
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
        { label: "agent reply (first audio)", data: pcts.map((p) => round(o.first_audio_latency_ms[p])), backgroundColor: C.agent },
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
  chart("chart-durations", {
    type: "bar",
    data: {
      labels: buckets.map((b) => b[0]),
      datasets: [{
        label: "calls",
        data: buckets.map(([, lo, hi]) => data.durations.filter((s) => s >= lo && s < hi).length),
        backgroundColor: C.accent,
      }],
    },
    options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } },
  });

  chart("chart-duration-days", {
    type: "bar",
    data: {
      labels: days,
      datasets: [{
        label: "mean duration (s)",
        data: data.days.map((d) => (d.mean_duration_s === null ? 0 : Math.round(d.mean_duration_s))),
        backgroundColor: C.caller,
      }],
    },
    options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true, title: { display: true, text: "seconds" } } } },
  });

  const reasons = Object.entries(o.by_end_reason).sort((a, b) => b[1] - a[1]);
  chart("chart-reasons", {
    type: "bar",
    data: {
      labels: reasons.map(([r]) => r.replaceAll("_", " ")),
      datasets: [{ label: "calls", data: reasons.map(([, n]) => n), backgroundColor: C.agent }],
    },
    options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: { beginAtZero: true, ticks: { precision: 0 } } } },
  });
  window.livecallCharts = charts;
})();
