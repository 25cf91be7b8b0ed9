// Model files: each node's copies (status, progress bars with rate and ETA, errors) and its disk.
//
// Reads only the replicated state: `modelCopies` ({node: {model: copy}}) and
// `nodeDisk` ({node: {totalBytes, freeBytes, modelsBytes, budgetBytes}}).

import { bytes, h } from "./dom.js";
import { nodeName } from "./store.js";

const STATUS_CLASS = { verified: "ok", staged: "busy", requested: "busy", downloading: "busy", evicting: "busy", failed: "bad" };

function duration(s) {
  if (s === null || s === undefined) return "?";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function layersText(cov) {
  if (!cov || !cov.nLayers || (!(cov.layers || []).length && !cov.head)) return "";
  const runs = (cov.layers || []).map(([a, b]) => (b - a === 1 ? `${a}` : `${a}–${b - 1}`)).join(", ");
  const whole = cov.head && cov.layers.length === 1 && cov.layers[0][0] === 0 && cov.layers[0][1] === cov.nLayers;
  if (whole) return "whole model";
  return `layers ${runs || "none"} of ${cov.nLayers}${cov.head ? " + head" : ""}`;
}

/** One copy: its status, what it holds, and a progress bar while bytes move. */
export function copyRow(model, copy) {
  const moving = copy.status === "downloading" || copy.status === "requested";
  const pct = copy.totalBytes > 0 ? Math.min(100, (100 * copy.doneBytes) / copy.totalBytes) : 0;
  return h("div", { class: "copy", "data-testid": "model-copy" },
    h("div", {}, h("span", { class: "mono" }, model), " ",
      h("span", { class: `status ${STATUS_CLASS[copy.status] || ""}` }, copy.status),
      copy.source ? h("span", { class: "muted" }, ` from ${copy.source}`) : null),
    moving ? [
      h("div", { class: "bar", title: `${pct.toFixed(0)} %` }, h("div", { class: "fill", style: `width:${pct.toFixed(1)}%` })),
      h("div", { class: "muted" }, copy.totalBytes > 0
        ? `${bytes(copy.doneBytes)} of ${bytes(copy.totalBytes)} · ${bytes(copy.rateBps)}/s · ETA ${duration(copy.etaS)}`
        : "waiting to start"),
    ] : h("div", { class: "muted" }, [layersText(copy.coverage), copy.bytes ? ` · ${bytes(copy.bytes)}` : ""].join("")),
    copy.error && copy.status !== "evicting" ? h("div", { class: "error" }, copy.error) : null);
}

/** A node's models disk as a bar: used by models, used by the rest, free (and the budget). */
export function diskBar(disk) {
  if (!disk) return h("div", { class: "muted" }, "disk not reported yet");
  const used = disk.totalBytes - disk.freeBytes;
  const models = Math.min(disk.modelsBytes || 0, used);
  const pct = (x) => (disk.totalBytes > 0 ? (100 * x) / disk.totalBytes : 0);
  return h("div", { class: "mem", "data-testid": "node-disk" },
    h("div", { class: "bar stacked" },
      h("div", { class: "fill", style: `width:${pct(models).toFixed(1)}%` }),
      h("div", { class: "fill other", style: `width:${pct(used - models).toFixed(1)}%` })),
    h("span", { class: "muted" }, `disk: ${bytes(disk.freeBytes)} free of ${bytes(disk.totalBytes)} · models ${bytes(models)}`
      + (disk.budgetBytes ? ` (budget ${bytes(disk.budgetBytes)})` : "")));
}

/** Every node's disk and copies. */
export function modelFilesPanel(state) {
  const copies = state.modelCopies || {};
  const disks = state.nodeDisk || {};
  const nodes = [...new Set([...Object.keys(copies), ...Object.keys(disks)])].sort();
  return h("section", { class: "panel", "data-testid": "model-files" },
    h("h2", {}, "Model files"),
    nodes.length ? nodes.map((node) => h("div", { class: "card" },
      h("header", {}, h("span", { class: "title" }, nodeName(node))),
      diskBar(disks[node]),
      Object.entries(copies[node] || {}).sort(([a], [b]) => a.localeCompare(b)).map(([m, c]) => copyRow(m, c)),
    )) : h("p", { class: "muted" }, "No node has reported model files yet."));
}
