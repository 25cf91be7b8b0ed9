// The one source of truth on the page: the node's /state and diagnostics, polled.
//
// Views subscribe and re-render what depends on the state. Polling (not a
// push channel) keeps the server side stateless; the interval comes from the
// page's <meta name="skulk-poll-ms">. A failed poll marks the page offline
// and keeps the last state on screen, so a node restart is visible, not blank.

import { getJSON } from "./api.js";

const listeners = new Set();

export const store = {
  state: null,          // /state (Skulk wire format)
  diag: null,           // /v1/diagnostics/node
  online: false,
  lastError: null,
  updatedAt: 0,
};

export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function emit() {
  for (const fn of listeners) {
    try { fn(store); } catch (err) { console.error("dashboard view failed to render", err); }
  }
}

export async function refresh() {
  try {
    const [state, diag] = await Promise.all([getJSON("/state"), getJSON("/v1/diagnostics/node")]);
    store.state = state;
    store.diag = diag;
    store.online = true;
    store.lastError = null;
    store.updatedAt = Date.now();
  } catch (err) {
    store.online = false;
    store.lastError = String(err.message || err);
  }
  emit();
}

export function startPolling() {
  const meta = document.querySelector('meta[name="skulk-poll-ms"]');
  const every = Math.max(250, Number(meta && meta.content) || 1000);
  refresh();
  setInterval(refresh, every);
}

/** Friendly name of a node, or its id. */
export function nodeName(nodeId) {
  const identity = store.state && store.state.nodeIdentities && store.state.nodeIdentities[nodeId];
  return (identity && identity.friendlyName) || nodeId;
}

/** The master's node id for this session, or null. */
export function masterId() {
  return (store.state && store.state.session && store.state.session.master) || null;
}
