// Live calls: one card per call in progress, its transcript growing word by word as Gemini
// transcribes (server-sent events from /live/events: `partial` lines are replaced in place,
// then by the finished `turn`), with an end-call button.
"use strict";
(function () {
  const lc = window.livecall;
  const grid = document.getElementById("live-calls");
  const endedGrid = document.getElementById("ended-calls");
  const status = document.getElementById("live-status");
  const empty = document.getElementById("no-live");
  const cardTemplate = document.getElementById("live-card-template");
  const startedAt = new Map(); // call_sid -> performance.now() when the call started

  const cardFor = (sid) => grid.querySelector(`article[data-sid="${CSS.escape(sid)}"]`);

  function refresh() {
    const n = grid.children.length;
    empty.hidden = n > 0;
    lc.setLiveCount(n);
    document.getElementById("ended-title").hidden = endedGrid.children.length === 0;
  }

  function describe(card, info) {
    const who = [info.from_number, info.profile ? `→ ${info.profile}` : ""].filter(Boolean).join(" ");
    if (who) card.querySelector(".who").textContent = who;
  }

  function ensureCard(sid, info, elapsedS) {
    let card = cardFor(sid);
    if (!card) {
      card = cardTemplate.content.firstElementChild.cloneNode(true);
      card.dataset.sid = sid;
      const link = card.querySelector("a.sid");
      link.href = `/calls/${encodeURIComponent(sid)}`;
      link.textContent = sid;
      card.querySelector("form.end-call").action = `/live/${encodeURIComponent(sid)}/end`;
      card.querySelector('input[name="csrf"]').value = lc.csrfToken();
      grid.prepend(card);
    }
    if (info) describe(card, info);
    if (!startedAt.has(sid)) {
      startedAt.set(sid, performance.now() - 1000 * (Number(elapsedS) || 0));
    }
    refresh();
    return card;
  }

  function addTurn(card, turn) {
    lc.upsertTurn(card.querySelector("ol.transcript"), turn);
    card.querySelector(".waiting").hidden = true;
  }

  function markEnded(sid, summary) {
    const card = cardFor(sid);
    if (!card) return;
    card.classList.add("ended");
    const state = card.querySelector(".state");
    state.textContent = summary && summary.end_reason ? `ended · ${summary.end_reason.replaceAll("_", " ")}` : "ended";
    card.querySelector(".waiting").hidden = true;
    startedAt.delete(sid);
    endedGrid.prepend(card);
    while (endedGrid.children.length > 6) endedGrid.lastElementChild.remove();
    refresh();
  }

  // Cards rendered by the server: take over their timers.
  for (const card of grid.children) {
    startedAt.set(card.dataset.sid, performance.now() - 1000 * (Number(card.dataset.elapsed) || 0));
  }

  setInterval(() => {
    for (const [sid, t0] of startedAt) {
      const card = cardFor(sid);
      if (!card) continue;
      const s = Math.floor((performance.now() - t0) / 1000);
      card.querySelector(".elapsed").textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    }
  }, 1000);

  grid.addEventListener("submit", async (event) => {
    const form = event.target.closest("form.end-call");
    if (!form) return;
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    button.textContent = "Ending…";
    try {
      const response = await lc.post(form.action);
      if (response.status === 404) markEnded(form.closest("article").dataset.sid, null);
      else if (!response.ok) throw new Error(`HTTP ${response.status}`);
    } catch (error) {
      button.disabled = false;
      button.textContent = "End call";
      status.textContent = `could not end the call (${error.message})`;
    }
  });

  const events = new EventSource("/live/events");
  const on = (type, handler) => events.addEventListener(type, (e) => handler(JSON.parse(e.data)));
  events.onopen = () => { status.textContent = "live"; status.dataset.state = "open"; };
  events.onerror = () => {
    const closed = events.readyState === EventSource.CLOSED; // refused (signed out?): no retry
    status.textContent = closed ? "disconnected: reload the page" : "reconnecting…";
    status.dataset.state = closed ? "closed" : "reconnecting";
  };
  on("snapshot", ({ calls }) => {
    const live = new Set(calls.map((c) => c.call_sid));
    for (const card of [...grid.children]) if (!live.has(card.dataset.sid)) markEnded(card.dataset.sid, null);
    for (const call of calls) {
      const card = ensureCard(call.call_sid, call.info, call.elapsed_s);
      for (const turn of call.turns) addTurn(card, turn);
    }
    status.textContent = "live";
    status.dataset.state = "open";
  });
  on("call_started", (msg) => ensureCard(msg.call_sid, msg.info, 0));
  on("turn", (msg) => addTurn(ensureCard(msg.call_sid, null, 0), msg.turn));
  on("partial", (msg) => addTurn(ensureCard(msg.call_sid, null, 0), msg.turn));
  on("call_ended", (msg) => markEnded(msg.call_sid, msg.summary));
  window.addEventListener("pagehide", () => events.close());
  refresh();
})();
