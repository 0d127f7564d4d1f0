// Shared by every dashboard page: number formats, transcript lines, CSRF posts, nav counts,
// and what happens when the session is gone (back to the login page, then to this page).
"use strict";
(function () {
  const csrfToken = () => {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  };

  /** Milliseconds since the stream started, as the player shows it: m:ss.t */
  function offset(ms) {
    if (ms === null || ms === undefined) return "–";
    const s = Math.max(ms, 0) / 1000;
    const minutes = Math.floor(s / 60);
    return `${minutes}:${(s - minutes * 60).toFixed(1).padStart(4, "0")}`;
  }

  function ms(value) {
    return value === null || value === undefined ? "–" : `${Math.round(value).toLocaleString("en-US")} ms`;
  }

  /** Same thresholds as the server's: fast under 800 ms, slow from 1.5 s. */
  function latencyClass(value) {
    if (value === null || value === undefined) return "";
    return value < 800 ? "fast" : value < 1500 ? "ok" : "slow";
  }

  /** Fill a transcript line (cloned from #turn-template) from a live-feed turn. */
  function fillTurn(li, turn) {
    li.className = `turn ${turn.speaker}${turn.interrupted ? " interrupted" : ""}${turn.partial ? " partial" : ""}`;
    li.dataset.index = String(turn.index);
    li.querySelector(".at").textContent = offset(turn.start_ms);
    li.querySelector(".speaker").textContent = turn.speaker;
    if (turn.partial) li.setAttribute("aria-busy", "true"); else li.removeAttribute("aria-busy");
    const shown = turn.interrupted && turn.heard_text ? turn.heard_text : turn.text;
    li.querySelector(".text").textContent = shown || "…";
    li.querySelector(".badge.cut").hidden = !turn.interrupted;
    const latency = li.querySelector(".badge.latency");
    const late = turn.first_audio_latency_ms;
    latency.hidden = late === null || late === undefined;
    latency.className = `badge latency ${latencyClass(late)}`;
    latency.textContent = latency.hidden ? "" : ms(late);
    return li;
  }

  /** Add or replace the line for `turn` in a transcript list, kept in turn order.
   *  A partial line (words so far) is replaced in place; it never replaces a final one. */
  function upsertTurn(list, turn) {
    const template = document.getElementById("turn-template");
    const existing = list.querySelector(`li[data-index="${Number(turn.index)}"]`);
    if (existing && turn.partial && !existing.classList.contains("partial")) return existing;
    const li = existing || template.content.firstElementChild.cloneNode(true);
    fillTurn(li, turn);
    if (!existing) {
      const after = [...list.children].find((other) => Number(other.dataset.index) > turn.index);
      list.insertBefore(li, after || null);
      list.scrollTop = list.scrollHeight;
    }
    return li;
  }

  /** POST (a form body if given) with the session's CSRF token; the cookie goes along. */
  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRF-Token": csrfToken(), Accept: "application/json" },
      body: body || undefined,
    });
  }

  /** The login page, coming back to this page afterwards. */
  function toLogin() {
    const here = location.pathname + location.search;
    location.assign(`/login?next=${encodeURIComponent(here)}`);
  }

  /** A 401 means signed out (elsewhere, or the session ran out): go and sign in again. */
  function signedOut(response) {
    if (response.status !== 401) return false;
    toLogin();
    return true;
  }

  /** Sets a nav count badge (its hidden label stays for screen readers). */
  function setCount(id, n) {
    const badge = document.getElementById(id);
    if (!badge || n === null || n === undefined) return;
    badge.lastChild.textContent = String(n);
    badge.hidden = !n;
  }

  const setLiveCount = (n) => setCount("live-count", n);

  window.livecall = {
    csrfToken, offset, ms, latencyClass, fillTurn, upsertTurn, post, toLogin,
    signedOut, setCount, setLiveCount,
  };
})();
