// Dashboard entry point: a history-API router over the views, and the poller.
//
// Deep links work because the server answers any page path with index.html;
// this router then picks the view from location.pathname. Links marked
// `data-link` navigate without a reload.

import { chatView, instanceView, nodeView, notFound, overview, placeView } from "./views.js";
import { startPolling, store, subscribe } from "./store.js";
import { apiKey, setApiKey } from "./api.js";
import { h } from "./dom.js";

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

// API keys: asked for once, on the first 401, and kept in this browser (api.js).
let keyForm = null;
window.addEventListener("skulk:needs-key", (event) => {
  if (keyForm) return;
  const input = h("input", { type: "password", autocomplete: "off", "data-testid": "api-key-input", placeholder: "API key" });
  const save = () => {
    const key = input.value.trim();
    if (!key) return;
    setApiKey(key);
    keyForm.remove();
    keyForm = null;
    route();
  };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") save(); });
  const note = event.detail && event.detail.hadKey
    ? "The saved API key was refused; enter a valid one."
    : "This node requires an API key (SKULK_API_KEYS). It is kept in this browser only.";
  keyForm = h("div", { class: "key-overlay", "data-testid": "api-key-form" },
    h("div", { class: "panel key-panel" }, h("h2", {}, "API key"), h("p", { class: "muted" }, note),
      h("div", { class: "form-row" }, input, h("button", { "data-testid": "api-key-save", onClick: save }, "Save"),
        apiKey() ? h("button", { class: "danger", onClick: () => { setApiKey(""); input.value = ""; } }, "Forget") : null)));
  document.body.append(keyForm);
  input.focus();
});

route();
startPolling();
