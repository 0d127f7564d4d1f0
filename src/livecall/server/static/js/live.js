// Live calls: one card per call in progress, its transcript growing word by word as Gemini
// transcribes (server-sent events from /live/events: `partial` lines are replaced in place,
// then by the finished `turn`), with an end-call button that asks first.
// Honest about the connection: when the server cannot be reached the timers stop and the
// cards say their state is unknown; a signed-out session goes back to the login page.
"use strict";
(function () {
  const lc = window.livecall;
  const grid = document.getElementById("live-calls");
  const endedGrid = document.getElementById("ended-calls");
  const status = document.getElementById("live-status");
  const announce = document.getElementById("live-announce");
  const empty = document.getElementById("no-live");
  const cardTemplate = document.getElementById("live-card-template");
  const startedAt = new Map(); // call_sid -> performance.now() when the call started
  let connected = false;

  const cardFor = (sid) => grid.querySelector(`article[data-sid="${CSS.escape(sid)}"]`);
  const who = (card) => card.querySelector(".who").textContent.trim() || "an unknown number";

  function refresh() {
    const n = grid.children.length;
    empty.hidden = n > 0;
    lc.setLiveCount(n);
    document.getElementById("ended-title").hidden = endedGrid.children.length === 0;
  }

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
    for (const card of grid.children) {
      const badge = card.querySelector(".state");
      badge.dataset.state = state === "open" ? "live" : "stale";
      badge.textContent = state === "open" ? "live" : "unknown";
    }
  }

  function describe(card, info) {
    if (info.from_number) card.querySelector(".who").textContent = info.from_number;
    if (info.profile) card.querySelector(".line").textContent = `${info.profile} line`;
  }

  function ensureCard(sid, info, elapsedS) {
    let card = cardFor(sid);
    if (!card) {
      card = cardTemplate.content.firstElementChild.cloneNode(true);
      card.dataset.sid = sid;
      card.querySelector("a.who-link").href = `/calls/${encodeURIComponent(sid)}`;
      card.querySelector("form.end-call").action = `/live/${encodeURIComponent(sid)}/end`;
      card.querySelector('input[name="csrf"]').value = lc.csrfToken();
      grid.prepend(card);
      if (info) describe(card, info);
      announce.textContent = `New call from ${who(card)}.`;
    } else if (info) {
      describe(card, info);
    }
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

  function markEnded(sid, summary, words) {
    const card = cardFor(sid);
    if (!card) return;
    card.classList.add("ended");
    const state = card.querySelector(".state");
    state.dataset.state = "ended";
    state.textContent = words || (summary && summary.end_reason ? `ended · ${summary.end_reason.replaceAll("_", " ")}` : "ended");
    card.querySelector(".waiting").hidden = true;
    startedAt.delete(sid);
    endedGrid.prepend(card);
    while (endedGrid.children.length > 6) endedGrid.lastElementChild.remove();
    announce.textContent = `The call with ${who(card)} ended.`;
    refresh();
  }

  // Cards rendered by the server: take over their timers.
  for (const card of grid.children) {
    startedAt.set(card.dataset.sid, performance.now() - 1000 * (Number(card.dataset.elapsed) || 0));
  }

  // Timers only tick while the server is there to say the calls are still going.
  setInterval(() => {
    if (!connected) return;
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
    const card = form.closest("article");
    if (!window.confirm(`End the call with ${who(card)}? They will be cut off.`)) return;
    const button = form.querySelector("button");
    const problem = form.querySelector(".end-error");
    button.disabled = true;
    button.textContent = "Ending…";
    problem.textContent = "";
    try {
      const response = await lc.post(form.action);
      if (lc.signedOut(response)) return;
      if (response.status === 404) markEnded(card.dataset.sid, null);
      else if (!response.ok) throw new Error(`the server answered ${response.status}`);
    } catch (error) {
      button.disabled = false;
      button.textContent = "End call";
      problem.textContent = error instanceof TypeError
        ? "Could not reach the server: the call was not ended."
        : `Could not end the call (${error.message}).`;
    }
  });

  const events = new EventSource("/live/events");
  const on = (type, handler) => events.addEventListener(type, (e) => handler(JSON.parse(e.data)));
  events.onopen = () => { connected = true; setStatus("open", "live"); };
  events.onerror = async () => {
    connected = false;
    if (events.readyState !== EventSource.CLOSED) {
      setStatus("reconnecting", "Connection lost: reconnecting… (timers paused)");
      return;
    }
    // refused: signed out, or the server is gone for good; ask which
    try {
      const probe = new AbortController();
      const response = await fetch("/live/events", { credentials: "same-origin", signal: probe.signal });
      probe.abort();
      if (lc.signedOut(response)) return;
    } catch { /* unreachable */ }
    setStatus("closed", "Disconnected from the server: reload the page to try again.");
  };
  on("snapshot", ({ calls }) => {
    const live = new Set(calls.map((c) => c.call_sid));
    for (const card of [...grid.children]) if (!live.has(card.dataset.sid)) markEnded(card.dataset.sid, null);
    for (const call of calls) {
      const card = ensureCard(call.call_sid, call.info, call.elapsed_s);
      startedAt.set(call.call_sid, performance.now() - 1000 * (Number(call.elapsed_s) || 0));
      for (const turn of call.turns) addTurn(card, turn);
    }
    connected = true;
    setStatus("open", "live");
  });
  on("call_started", (msg) => ensureCard(msg.call_sid, msg.info, 0));
  on("turn", (msg) => addTurn(ensureCard(msg.call_sid, null, 0), msg.turn));
  on("partial", (msg) => addTurn(ensureCard(msg.call_sid, null, 0), msg.turn));
  on("call_ended", (msg) => markEnded(msg.call_sid, msg.summary, msg.ended_words));
  window.addEventListener("pagehide", () => events.close());
  refresh();
})();
