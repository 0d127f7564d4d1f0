// The calls list: a tap anywhere on a row (a card on a phone) opens the call.
"use strict";
(function () {
  const table = document.getElementById("calls");
  if (!table) return;
  table.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-href]");
    if (!row || event.target.closest("a, button")) return;
    window.location.assign(row.dataset.href);
  });
})();
