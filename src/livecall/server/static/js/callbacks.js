// "Needs a call back": marking a call handled takes it off the list in place (no reload),
// updates the nav's count and says so to screen readers; without script the form posts.
"use strict";
(function () {
  const lc = window.livecall;
  const list = document.getElementById("callbacks");
  const announce = document.getElementById("callbacks-announce");
  if (!list) return;
  list.addEventListener("submit", async (event) => {
    const form = event.target.closest("form.mark-handled");
    if (!form) return;
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    const body = new URLSearchParams(new FormData(form));
    let response;
    try {
      response = await lc.post(form.action, body);
    } catch {
      button.disabled = false;
      announce.textContent = "Could not reach the server: nothing was changed.";
      return;
    }
    if (lc.signedOut(response)) return;
    if (!response.ok) {
      button.disabled = false;
      announce.textContent = `Could not mark it (HTTP ${response.status}).`;
      return;
    }
    const data = await response.json();
    const item = form.closest("li");
    const who = item.querySelector("h2").textContent.trim();
    item.remove();
    lc.setCount("callback-count", data.waiting);
    const left = list.children.length;
    document.getElementById("callbacks-total").textContent = `${left} call${left === 1 ? "" : "s"}`;
    announce.textContent = `${who}: ${data.handled ? "marked handled" : "back on the list"}.`;
  });
})();
