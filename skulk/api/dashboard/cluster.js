// Read-only cluster panels: topology (nodes, memory, links by kind, master)
// and instances (placement, runner states, speculation). Rebuilt on each poll.

import { h, bytes, tagged } from "./dom.js";
import { masterId, nodeName } from "./store.js";

// Link kinds, best first (the ring's preference order), with their colours.
export const LINK_KINDS = [
  ["thunderbolt", "#a855f7"],
  ["ethernet", "#3b82f6"],
  ["wifi", "#f59e0b"],
  ["unknown", "#9ca3af"],
  ["vpn", "#ef4444"],
];
const KIND_RANK = Object.fromEntries(LINK_KINDS.map(([k], i) => [k, i]));
const KIND_COLOUR = Object.fromEntries(LINK_KINDS);

const SERVING = new Set(["RunnerReady", "RunnerRunning"]);
const FAILING = new Set(["RunnerFailed", "RunnerShutdown", "RunnerShuttingDown"]);

export function statusClass(status) {
  if (SERVING.has(status)) return "ok";
  if (FAILING.has(status)) return "bad";
  return "busy";
}

/** Undirected links: the best observed kind per pair of nodes. */
export function links(state) {
  const best = new Map();
  for (const c of (state.topology && state.topology.connections) || []) {
    const [a, b] = [c.source, c.sink].sort();
    const key = `${a}|${b}`;
    const prev = best.get(key);
    if (!prev || KIND_RANK[c.kind] < KIND_RANK[prev.kind]) best.set(key, { a, b, kind: c.kind, address: c.address });
  }
  return [...best.values()].sort((x, y) => (x.a + x.b).localeCompare(y.a + y.b));
}

function memoryOf(state, nodeId) {
  const m = state.nodeMemory && state.nodeMemory[nodeId];
  if (!m) return null;
  return { total: m.ramTotal.inBytes, available: m.ramAvailable.inBytes };
}

/** Which instances host a rank on each node: {nodeId: [instanceId, ...]}. */
function hostedBy(state) {
  const out = {};
  for (const [iid, inst] of Object.entries(state.instances || {})) {
    const [, body] = tagged(inst);
    for (const nodeId of Object.keys(body.shardAssignments.nodeToRunner)) (out[nodeId] ||= []).push(iid);
  }
  return out;
}

export function topologyPanel(state, { selected } = {}) {
  const nodes = [...((state.topology && state.topology.nodes) || [])].sort();
  const master = masterId();
  const size = 420;
  const centre = size / 2;
  const radius = nodes.length > 1 ? 140 : 0;
  const pos = {};
  nodes.forEach((n, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, nodes.length);
    pos[n] = [centre + radius * Math.cos(angle), centre + radius * Math.sin(angle)];
  });
  const edges = links(state).filter((l) => pos[l.a] && pos[l.b]);
  const svg = h("svg", { viewBox: `0 0 ${size} ${size}`, class: "topology", role: "img", "aria-label": "cluster topology" },
    edges.map((l) => h("line", {
      x1: pos[l.a][0], y1: pos[l.a][1], x2: pos[l.b][0], y2: pos[l.b][1],
      stroke: KIND_COLOUR[l.kind] || "#9ca3af", "stroke-width": 4,
      "stroke-dasharray": l.kind === "vpn" ? "8 6" : null,
      "data-testid": "link", "data-kind": l.kind,
    }, h("title", {}, `${nodeName(l.a)} ↔ ${nodeName(l.b)}: ${l.kind} (${l.address})`))),
    nodes.map((n) => {
      const [x, y] = pos[n];
      const mem = memoryOf(state, n);
      const used = mem ? 1 - mem.available / mem.total : 0;
      return h("g", { class: "node-dot" + (n === selected ? " selected" : ""), "data-node": n },
        h("circle", { cx: x, cy: y, r: 34, class: n === master ? "master" : "" }),
        h("path", { d: arc(x, y, 40, used), class: "mem-arc" }),
        h("text", { x, y: y + 4, "text-anchor": "middle", class: "node-label" }, nodeName(n)),
        n === master ? h("text", { x, y: y - 46, "text-anchor": "middle", class: "master-label" }, "★ master") : null);
    }));
  const legend = h("div", { class: "legend" },
    LINK_KINDS.map(([kind, colour]) => h("span", { class: "legend-item" },
      h("i", { style: `background:${colour}` }), kind)));
  return h("section", { class: "panel", "data-testid": "topology" },
    h("h2", {}, "Topology"),
    svg, legend,
    h("div", { class: "node-grid" }, nodes.map((n) => nodeCard(state, n, master, hostedBy(state)[n] || []))));
}

function arc(cx, cy, r, fraction) {
  // Memory in use, as an arc clockwise from the top.
  const f = Math.min(0.999, Math.max(0, fraction));
  const a = -Math.PI / 2 + 2 * Math.PI * f;
  const [x0, y0] = [cx, cy - r];
  const [x1, y1] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  return `M ${x0} ${y0} A ${r} ${r} 0 ${f > 0.5 ? 1 : 0} 1 ${x1} ${y1}`;
}

function nodeCard(state, nodeId, master, hosted) {
  const mem = memoryOf(state, nodeId);
  const identity = (state.nodeIdentities || {})[nodeId] || {};
  const sys = (state.nodeSystem || {})[nodeId] || {};
  const net = ((state.nodeNetwork || {})[nodeId] || {}).interfaces || [];
  const usedPct = mem ? Math.round(100 * (1 - mem.available / mem.total)) : 0;
  return h("article", { class: "card node-card", "data-testid": "node-card", "data-node": nodeId },
    h("header", {},
      h("a", { href: `/nodes/${encodeURIComponent(nodeId)}`, "data-link": true, class: "title" }, identity.friendlyName || nodeId),
      nodeId === master ? h("span", { class: "badge master", "data-testid": "master-badge" }, "master") : null),
    h("div", { class: "muted mono" }, nodeId),
    mem ? h("div", { class: "mem" },
      h("div", { class: "bar" }, h("div", { class: "fill", style: `width:${usedPct}%` })),
      h("span", {}, `${bytes(mem.total - mem.available)} used of ${bytes(mem.total)}`))
      : h("div", { class: "muted" }, "memory not reported yet"),
    h("div", { class: "muted" }, [sys.platform, sys.chip, sys.cpuCount ? `${sys.cpuCount} cores` : null, identity.version ? `v${identity.version}` : null].filter(Boolean).join(" · ")),
    net.length ? h("div", { class: "ifaces" }, net.map((i) => h("span", { class: `chip kind-${i.kind}` }, `${i.name} ${i.ipAddress}`))) : null,
    hosted.length ? h("div", { class: "muted" }, `hosts ${hosted.length} instance${hosted.length > 1 ? "s" : ""}`) : null);
}

/** Rank 0's KV ledger for a runner, from the nodes' telemetry (null until reported). */
function kvOf(state, runnerId) {
  for (const ledgers of Object.values(state.nodeKv || {})) {
    if (ledgers[runnerId]) return ledgers[runnerId];
  }
  return null;
}

/** KV use of one instance: the rows' reservation and the prefix cache against the runner's budget. */
export function kvPanel(kv) {
  if (!kv || !kv.budgetPositions) return null;
  const pct = (n) => Math.min(100, (100 * n) / kv.budgetPositions);
  const per = kv.bytesPerPosition || 0;
  const num = (n) => Number(n).toLocaleString();
  const lookups = (kv.prefixHits || 0) + (kv.prefixMisses || 0);
  return h("div", { class: "mem kv", "data-testid": "kv-use" },
    h("div", { class: "bar", title: "rows (requests running) · prefix cache" },
      h("div", { class: "fill", style: `width:${pct(kv.rowsPositions)}%` }),
      h("div", { class: "fill cache", style: `width:${pct(kv.cachePositions)}%` })),
    h("span", {}, `KV ${num(kv.rowsPositions)} running + ${num(kv.cachePositions)} cached of ${num(kv.budgetPositions)} positions`
      + (per ? ` (${bytes((kv.rowsPositions + kv.cachePositions) * per)} of ${bytes(kv.budgetPositions * per)} on rank 0)` : "")),
    h("span", { class: "muted" }, `prefix cache: ${kv.cacheEntries} entr${kv.cacheEntries === 1 ? "y" : "ies"}, `
      + `${num(kv.prefixHits || 0)} hit${kv.prefixHits === 1 ? "" : "s"} of ${num(lookups)}, ${num(kv.positionsReused || 0)} tokens reused`
      + (kv.refused ? ` · ${num(kv.refused)} refused (503)` : "")));
}

export function speculationBadge(spec) {
  if (!spec || spec.drafter === "none" || !spec.depth) return null;
  const what = spec.drafter === "mtp" ? "MTP" : `draft ${spec.draftModelId || "model"}`;
  return h("span", { class: "badge spec", "data-testid": "spec-badge", title: `speculative decoding: ${what}, ${spec.depth} draft tokens per step` },
    `⚡ speculative · depth ${spec.depth}`);
}

export function instanceCard(state, iid, { onDelete } = {}) {
  const [kind, body] = tagged(state.instances[iid]);
  const sa = body.shardAssignments;
  const runnerOfNode = sa.nodeToRunner;
  const rows = Object.entries(runnerOfNode).map(([nodeId, runnerId]) => {
    const [shardKind, shard] = tagged(sa.runnerToShard[runnerId]);
    const [status, statusBody] = tagged((state.runners || {})[runnerId] || { RunnerPending: {} });
    return { nodeId, runnerId, shardKind, shard, status, statusBody };
  }).sort((a, b) => a.shard.deviceRank - b.shard.deviceRank);
  const sharding = rows.length && rows[0].shardKind === "TensorShardMetadata" ? "Tensor" : "Pipeline";
  const kv = rows.length ? kvOf(state, rows[0].runnerId) : null;
  const hops = body.ring || [];
  return h("article", { class: "card instance-card", "data-testid": "instance-card", "data-instance": iid },
    h("header", {},
      h("a", { href: `/instances/${encodeURIComponent(iid)}`, "data-link": true, class: "title" }, sa.modelId),
      h("span", { class: "badge" }, `${sharding} · ${kind.replace("Instance", "")}`),
      speculationBadge(body.speculation),
      onDelete ? h("button", { class: "danger small", onClick: () => onDelete(iid), "data-testid": "delete-instance" }, "Delete") : null),
    h("div", { class: "muted mono" }, `${iid} · context ${Number(body.contextCeiling).toLocaleString()} tokens`),
    kvPanel(kv),
    h("table", { class: "ranks" },
      h("thead", {}, h("tr", {}, h("th", {}, "rank"), h("th", {}, "node"), h("th", {}, "shard"), h("th", {}, "memory"), h("th", {}, "runner"))),
      h("tbody", {}, rows.map((r) => h("tr", {},
        h("td", {}, r.shard.deviceRank),
        h("td", {}, nodeName(r.nodeId)),
        h("td", { class: "mono" }, r.shardKind === "PipelineShardMetadata"
          ? `layers ${r.shard.startLayer}–${r.shard.endLayer - 1} of ${r.shard.nLayers}`
          : `1/${r.shard.worldSize} of ${r.shard.nLayers} layers`),
        h("td", {}, bytes((body.memoryByNode || {})[r.nodeId])),
        h("td", {}, h("span", { class: `status ${statusClass(r.status)}`, "data-testid": "runner-status", title: r.statusBody && r.statusBody.errorMessage || "" },
          r.status.replace("Runner", ""))))))),
    hops.length ? h("div", { class: "ring muted" }, "ring: ", hops.map((hop, i) => h("span", { class: `chip kind-${hop.kind}` },
      `${i}:${nodeName(hop.nodeId)} ${hop.address} (${hop.kind})`))) : null);
}

export function instancesPanel(state, opts) {
  const ids = Object.keys(state.instances || {}).sort();
  return h("section", { class: "panel", "data-testid": "instances" },
    h("h2", {}, `Instances (${ids.length})`),
    ids.length ? ids.map((iid) => instanceCard(state, iid, opts))
      : h("p", { class: "muted" }, "No model is placed. ", h("a", { href: "/place", "data-link": true }, "Place one"), "."));
}
