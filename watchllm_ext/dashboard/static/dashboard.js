// WatchLLM dashboard: the little JavaScript it has. Every page works without it; this adds
// auto-submit of the range selects, auto-refresh of the overview, the browser's time zone
// as a choice, and j/k keyboard moves between table rows.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // A select marked data-autosubmit applies at once.
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form && select.form.requestSubmit());
  }

  // Loading: say so while the next page is on its way (server pages can take a moment).
  const progress = document.getElementById("progress");
  const loading = () => {
    document.body.classList.add("loading");
    if (progress) progress.textContent = "Loading…";
  };
  document.addEventListener("submit", loading);
  document.addEventListener("click", (event) => {
    const link = event.target instanceof Element ? event.target.closest("a[href]") : null;
    if (!link || link.getAttribute("href").startsWith("#") || link.target === "_blank") return;
    if (!event.ctrlKey && !event.metaKey && !event.shiftKey) loading();
  });
  window.addEventListener("pageshow", () => {  // back/forward cache: not loading any more
    document.body.classList.remove("loading");
    if (progress) progress.textContent = "";
  });

  // Offer the browser's own zone in the time-zone select.
  const zones = document.querySelector("select[data-browser-zone]");
  const own = Intl.DateTimeFormat().resolvedOptions().timeZone;
  if (zones && own && ![...zones.options].some((o) => o.value === own)) {
    zones.add(new Option(`${own} (this browser)`, own));
  }

  // Auto-refresh: fetch this page again and swap the live region; pauses in hidden tabs.
  const live = document.getElementById("live");
  const every = live ? Number(live.dataset.refresh || 0) : 0;
  if (live && every > 0) {
    setInterval(async () => {
      if (document.visibilityState !== "visible") return;
      live.setAttribute("aria-busy", "true");
      try {
        const answer = await fetch(location.href, { credentials: "same-origin" });
        if (answer.redirected) { location.href = answer.url; return; } // the session ended
        if (!answer.ok) return;
        const doc = new DOMParser().parseFromString(await answer.text(), "text/html");
        const fresh = doc.getElementById("live");
        if (fresh) live.innerHTML = fresh.innerHTML;
      } finally {
        live.setAttribute("aria-busy", "false");
      }
    }, every * 1000);
  }

  // j / k: next / previous row's first link; Enter follows it (native).
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const target = event.target;
    if (target instanceof HTMLInputElement || target instanceof HTMLSelectElement ||
        target instanceof HTMLTextAreaElement) return;
    if (event.key !== "j" && event.key !== "k") return;
    const links = [...document.querySelectorAll("tr[data-row] a")].filter(
      (a, i, all) => all.findIndex((b) => b.closest("tr") === a.closest("tr")) === i);
    if (!links.length) return;
    const at = links.findIndex((a) => a.closest("tr") === document.activeElement?.closest("tr"));
    const next = event.key === "j" ? Math.min(at + 1, links.length - 1) : Math.max(at - 1, 0);
    links[next].focus();
    event.preventDefault();
  });
});
