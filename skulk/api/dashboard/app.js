// Dashboard entry point: a history-API router over the views, and the poller.
//
// Deep links work because the server answers any page path with index.html;
// this router then picks the view from location.pathname. Links marked
// `data-link` navigate without a reload.

import { chatView, instanceView, nodeView, notFound, overview, placeView } from "./views.js";
import { startPolling, store, subscribe } from "./store.js";

const ROUTES = [
  [/^\/$/, overview, "overview"],
  [/^\/place\/?$/, placeView, "place"],
  [/^\/chat\/?$/, chatView, "chat"],
  [/^\/instances\/([^/]+)\/?$/, (el, m) => instanceView(el, { id: m[1] }), "overview"],
  [/^\/nodes\/([^/]+)\/?$/, (el, m) => nodeView(el, { id: m[1] }), "overview"],
];

const view = document.getElementById("view");
let unmount = () => {};

function route() {
  unmount();
  const path = location.pathname;
  for (const [pattern, mount, nav] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    const decoded = match.map((part) => (part === undefined ? part : decodeURIComponent(part)));
    unmount = mount(view, decoded) || (() => {});
    highlight(nav);
    return;
  }
  unmount = notFound(view, { path });
  highlight(null);
}

function highlight(nav) {
  for (const a of document.querySelectorAll("nav a[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  if (link.getAttribute("href") !== location.pathname) history.pushState({}, "", link.getAttribute("href"));
  route();
});
window.addEventListener("popstate", route);

const conn = document.getElementById("conn");
subscribe(() => {
  if (!store.online) {
    conn.textContent = `offline: ${store.lastError || "no answer"}`;
    conn.className = "conn bad";
    return;
  }
  const rt = store.diag && store.diag.runtime;
  conn.textContent = rt ? `${rt.friendlyName} · ${rt.isMaster ? "master" : "follower"} · v${rt.skulkVersion}` : "online";
  conn.className = "conn ok";
});

route();
startPolling();
