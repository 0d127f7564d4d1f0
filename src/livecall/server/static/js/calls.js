// The calls list: whole rows open the call, and a quick filter over the rows on this page.
"use strict";
(function () {
  const table = document.getElementById("calls");
  const quick = document.getElementById("quick-filter");
  if (!table) {
    if (quick) quick.hidden = true;
    return;
  }
  table.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-href]");
    if (!row || event.target.closest("a, button")) return;
    window.location.assign(row.dataset.href);
  });
  quick.addEventListener("input", () => {
    const words = quick.value.toLowerCase().split(/\s+/).filter(Boolean);
    for (const row of table.tBodies[0].rows) {
      const text = row.dataset.search || "";
      row.hidden = !words.every((word) => text.includes(word));
    }
  });
})();
