// One call: the transcript follows the recording as it plays, times seek the player,
// and a chart shows the agent's latency turn by turn.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("call-data").textContent);
  const player = document.getElementById("player");
  const lines = [...document.querySelectorAll("#transcript > li.turn")].map((li, i, all) => {
    const start = Number(li.dataset.startMs);
    const next = all[i + 1] ? Number(all[i + 1].dataset.startMs) : Infinity;
    const end = li.dataset.endMs ? Number(li.dataset.endMs) : next;
    return { li, start, end: Math.max(end, start) };
  });

  let current = null;
  /** The line being spoken at `ms`: the latest one that started and has not ended. */
  function lineAt(ms) {
    let found = null;
    for (const line of lines) {
      if (line.start > ms) break;
      if (ms < line.end) found = line;
    }
    return found;
  }

  function highlight() {
    if (!player) return;
    const line = lineAt(player.currentTime * 1000);
    if (line === current) return;
    if (current) current.li.classList.remove("current");
    current = line;
    if (line) {
      line.li.classList.add("current");
      const box = line.li.getBoundingClientRect();
      if (box.top < 0 || box.bottom > window.innerHeight) line.li.scrollIntoView({ block: "center", behavior: "smooth" });
    }
  }

  if (player) {
    let frame = 0;
    const follow = () => {
      highlight();
      frame = player.paused ? 0 : requestAnimationFrame(follow);
    };
    player.addEventListener("play", () => { if (!frame) frame = requestAnimationFrame(follow); });
    for (const type of ["timeupdate", "seeked", "pause", "loadedmetadata"]) player.addEventListener(type, highlight);
    document.addEventListener("click", (event) => {
      const button = event.target.closest("[data-seek-ms]");
      if (!button) return;
      player.currentTime = Number(button.dataset.seekMs) / 1000;
      player.play().catch(() => {});
    });
  } else {
    for (const button of document.querySelectorAll("[data-seek-ms]")) button.disabled = true;
  }

  const canvas = document.getElementById("latency-chart");
  const turns = data.turns.filter((t) => t.first_audio_latency_ms !== null);
  if (!turns.length) {
    canvas.parentElement.outerHTML = '<p class="empty">No agent replies were timed in this call.</p>';
    return;
  }
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const palette = { fast: color("--ok"), ok: color("--warn"), slow: color("--danger") };
  Chart.defaults.color = color("--muted");
  Chart.defaults.borderColor = color("--line");
  const chart = new Chart(canvas, {
    type: "bar",
    data: {
      labels: turns.map((t) => `#${t.index} · ${window.livecall.offset(t.start_ms)}`),
      datasets: [{
        label: "first agent audio (ms)",
        data: turns.map((t) => Math.round(t.first_audio_latency_ms)),
        backgroundColor: turns.map((t) => palette[window.livecall.latencyClass(t.first_audio_latency_ms)]),
      }],
    },
    options: {
      responsive: true, maintainAspectRatio: false, animation: false,
      plugins: { legend: { display: false } },
      scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } } },
      onClick: (_event, elements) => {
        if (!elements.length || !player) return;
        player.currentTime = turns[elements[0].index].start_ms / 1000;
        player.play().catch(() => {});
      },
    },
  });
  canvas.dataset.ready = String(chart.data.datasets[0].data.length);
})();

// "Forget this caller": erasing a caller's memory asks first.
for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
}
