// The pages: overview, one instance, one node, placement, chat, not found.
//
// Each view is `mount(container, params) -> unmount`. Read-only parts re-render
// on every store update; interactive parts (forms, the chat transcript) are
// built once per mount so typing and streaming are never interrupted.

import { ApiError, getJSON, sendJSON, streamChat } from "./api.js";
import { instanceCard, instancesPanel, topologyPanel } from "./cluster.js";
import { bytes, h, replace, tagged } from "./dom.js";
import { copyRow, diskBar, modelFilesPanel } from "./files.js";
import { nodeName, refresh, store, subscribe } from "./store.js";

function live(container, render) {
  const draw = () => {
    if (!store.state) { replace(container, h("p", { class: "muted" }, "Loading cluster state…")); return; }
    replace(container, render(store.state));
  };
  draw();
  return subscribe(draw);
}

async function deleteInstance(iid) {
  if (!window.confirm(`Delete instance ${iid}? Its runners stop and requests to it fail.`)) return;
  try { await sendJSON("DELETE", `/instance/${encodeURIComponent(iid)}`); } catch (err) { window.alert(err.message); }
  refresh();
}

export function overview(container) {
  return live(container, (state) => h("div", {},
    h("div", { class: "columns" },
      topologyPanel(state),
      instancesPanel(state, { onDelete: deleteInstance })),
    h("div", { class: "columns", style: "margin-top:20px" }, modelFilesPanel(state))));
}

export function instanceView(container, { id }) {
  return live(container, (state) => {
    if (!(state.instances || {})[id]) {
      return h("section", { class: "panel" }, h("h2", {}, "Instance not found"),
        h("p", {}, `No instance ${id} in this session. `, h("a", { href: "/", "data-link": true }, "Back to the cluster"), "."));
    }
    const tasks = Object.values(state.tasks || {}).filter((t) => t.instanceId === id);
    return h("div", { class: "columns" },
      h("section", { class: "panel" }, h("h2", {}, "Instance"), instanceCard(state, id, { onDelete: deleteInstance }),
        h("h3", {}, `Tasks in flight (${tasks.length})`),
        tasks.length ? h("ul", {}, tasks.map((t) => h("li", { class: "mono" }, `${t.taskId} · ${t.kind} · ${t.status} · from ${nodeName(t.origin)}`)))
          : h("p", { class: "muted" }, "none")),
      topologyPanel(state));
  });
}

export function nodeView(container, { id }) {
  return live(container, (state) => {
    const known = (state.topology.nodes || []).includes(id);
    const runners = (store.diag && store.diag.runtime.nodeId === id) ? store.diag.runners : null;
    return h("div", { class: "columns" },
      topologyPanel(state, { selected: id }),
      h("section", { class: "panel", "data-testid": "node-detail" },
        h("h2", {}, nodeName(id)),
        known ? null : h("p", { class: "warn" }, "This node is not in the current topology."),
        h("h3", {}, "Model files"),
        diskBar((state.nodeDisk || {})[id]),
        Object.entries((state.modelCopies || {})[id] || {}).map(([m, c]) => copyRow(m, c)),
        h("pre", { class: "mono json" }, JSON.stringify({
          identity: state.nodeIdentities[id], memory: state.nodeMemory[id], network: state.nodeNetwork[id],
          system: state.nodeSystem[id], lastSeen: state.lastSeen[id], models: state.downloads[id],
        }, null, 2)),
        runners ? [h("h3", {}, "Runners on this node"), h("pre", { class: "mono json" }, JSON.stringify(runners, null, 2))] : null));
  });
}

// --- placement ------------------------------------------------------------------------------

export function placeView(container) {
  const form = { model: "", sharding: "Pipeline", meta: "MlxRing", excluded: new Set() };
  const modelSelect = h("select", { id: "place-model", "data-testid": "place-model", onChange: (e) => { form.model = e.target.value; update(); } });
  const shardingSelect = h("select", { id: "place-sharding", onChange: (e) => { form.sharding = e.target.value; update(); } },
    h("option", { value: "Pipeline" }, "Pipeline (layers split by memory)"), h("option", { value: "Tensor" }, "Tensor (every layer split)"));
  const metaSelect = h("select", { id: "place-meta", onChange: (e) => { form.meta = e.target.value; update(); } },
    h("option", { value: "MlxRing" }, "MLX ring (TCP)"), h("option", { value: "MlxJaccl" }, "JACCL (RDMA over Thunderbolt 5)"));
  const exclusions = h("div", { class: "exclusions", "data-testid": "exclusions" });
  const previews = h("div", { class: "previews", "data-testid": "previews" }, h("p", { class: "muted" }, "Choose a model."));
  const message = h("div", { class: "message", "data-testid": "place-message" });
  let nodesShown = "";
  let seq = 0;

  async function loadModels() {
    try {
      const { models } = await getJSON("/models/cards");
      replace(modelSelect, h("option", { value: "" }, "— model —"), models.map((m) => h("option", { value: m.modelId },
        `${m.modelId} (${bytes(m.weightBytes)}, ${m.nLayers} layers)`)));
      if (!form.model && models.length) { form.model = models.find((m) => m.modelId.includes("tiny"))?.modelId || models[0].modelId; }
      modelSelect.value = form.model;
      update();
    } catch (err) { replace(message, h("span", { class: "error" }, err.message)); }
  }

  function drawExclusions() {
    const nodes = (store.state && store.state.topology.nodes) || [];
    const key = nodes.join(",");
    if (key === nodesShown) return;
    nodesShown = key;
    replace(exclusions, nodes.length ? nodes.map((n) => h("label", { class: "check" },
      h("input", { type: "checkbox", value: n, checked: form.excluded.has(n), "data-testid": "exclude-node",
        onChange: (e) => { e.target.checked ? form.excluded.add(n) : form.excluded.delete(n); update(); } }),
      ` exclude ${nodeName(n)}`)) : h("span", { class: "muted" }, "no nodes yet"));
  }

  async function update() {
    if (!form.model) return;
    const mine = ++seq;
    const params = new URLSearchParams({ model_id: form.model });
    if (form.excluded.size) params.set("excluded_node_ids", [...form.excluded].join(","));
    try {
      const { previews: list } = await getJSON(`/instance/previews?${params}`);
      if (mine !== seq) return; // a newer request superseded this one
      const shown = list.filter((p) => p.sharding === form.sharding && p.instance_meta === form.meta);
      replace(previews, h("table", { class: "preview-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "nodes"), h("th", {}, "placement"), h("th", {}, "memory per node"),
          h("th", {}, "files to fetch"), h("th", {}, ""))),
        h("tbody", {}, shown.map((p) => previewRow(p)))));
    } catch (err) {
      if (mine === seq) replace(previews, h("p", { class: "error" }, err.message));
    }
  }

  function previewRow(p) {
    if (!p.instance) {
      return h("tr", { class: p.pending ? "pending" : "refused", "data-testid": "preview-row" },
        h("td", {}, p.node_count), h("td", { colspan: 4, class: "muted" }, (p.pending ? "⏳ " : "✗ ") + p.error));
    }
    const [, body] = tagged(p.instance);
    const sa = body.shardAssignments;
    const parts = Object.entries(sa.nodeToRunner).map(([node, runner]) => {
      const [, shard] = tagged(sa.runnerToShard[runner]);
      return { node, shard };
    }).sort((a, b) => a.shard.deviceRank - b.shard.deviceRank);
    return h("tr", { class: "feasible", "data-testid": "preview-row" },
      h("td", {}, p.node_count),
      h("td", {}, parts.map(({ node, shard }) => h("div", {}, `${nodeName(node)}: `,
        shard.startLayer !== undefined ? `layers ${shard.startLayer}–${shard.endLayer - 1}` : `1/${shard.worldSize}`))),
      h("td", {}, Object.entries(p.memory_delta_by_node).map(([node, b]) => h("div", {}, `${nodeName(node)} +${bytes(b)}`))),
      h("td", { "data-testid": "preview-transfer" }, Object.keys(p.transfer_bytes_by_node || {}).length
        ? Object.entries(p.transfer_bytes_by_node).map(([node, b]) => h("div", {}, `${nodeName(node)} ${bytes(b)}`))
        : h("span", { class: "muted" }, "none: the files are there")),
      h("td", {}, h("button", { "data-testid": "place-button", onClick: () => place(p.node_count) }, "Place")));
  }

  async function place(nodeCount) {
    replace(message, h("span", { class: "muted" }, "Placing…"));
    try {
      const out = await sendJSON("POST", "/place_instance", {
        model_id: form.model, sharding: form.sharding, instance_meta: form.meta,
        min_nodes: nodeCount, excluded_nodes: [...form.excluded],
      });
      replace(message, h("span", { class: "ok" }, `${out.message}. `, h("a", { href: `/instances/${encodeURIComponent(out.instance_id)}`, "data-link": true }, "View it")));
      refresh();
    } catch (err) {
      replace(message, h("span", { class: "error", "data-testid": "place-error" }, `${err.status}: ${err.message}`));
    }
  }

  replace(container, h("section", { class: "panel wide" },
    h("h2", {}, "Place a model"),
    h("div", { class: "form-row" }, h("label", { for: "place-model" }, "Model"), modelSelect),
    h("div", { class: "form-row" }, h("label", { for: "place-sharding" }, "Sharding"), shardingSelect),
    h("div", { class: "form-row" }, h("label", { for: "place-meta" }, "Interconnect"), metaSelect),
    h("div", { class: "form-row" }, h("label", {}, "Nodes"), exclusions),
    h("h3", {}, "Previews"), previews, message));
  loadModels();
  drawExclusions();
  return subscribe(() => drawExclusions());
}

// --- chat -------------------------------------------------------------------------------------

export function chatView(container) {
  const history = [];
  let controller = null;
  const modelSelect = h("select", { "data-testid": "chat-model", id: "chat-model" });
  const transcript = h("div", { class: "transcript", "data-testid": "chat-transcript" });
  const input = h("textarea", { rows: 3, placeholder: "Say something…", "data-testid": "chat-input",
    onKeydown: (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } } });
  const maxTokens = h("input", { type: "number", min: 1, value: 64, class: "narrow", "data-testid": "chat-max-tokens", title: "max_tokens" });
  const temperature = h("input", { type: "number", min: 0, max: 2, step: 0.1, value: "", placeholder: "default", class: "narrow", title: "temperature" });
  const sendButton = h("button", { "data-testid": "chat-send", onClick: () => send() }, "Send");
  const stopButton = h("button", { class: "danger", disabled: true, "data-testid": "chat-stop", onClick: () => controller && controller.abort() }, "Stop");
  const stats = h("div", { class: "muted mono", "data-testid": "chat-stats" });
  // Tools: an OpenAI "tools" array as JSON (optional), and how the model must use them.
  const toolsInput = h("textarea", { rows: 4, class: "mono", "data-testid": "chat-tools",
    placeholder: '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]' });
  const toolChoice = h("select", { "data-testid": "chat-tool-choice" },
    ["auto", "required", "none"].map((c) => h("option", { value: c }, c)));
  let modelsShown = "";

  function drawModels() {
    const models = new Set();
    for (const inst of Object.values((store.state && store.state.instances) || {})) models.add(tagged(inst)[1].shardAssignments.modelId);
    const list = [...models].sort();
    const key = list.join(",");
    if (key === modelsShown) return;
    modelsShown = key;
    const keep = modelSelect.value;
    replace(modelSelect, list.length ? list.map((m) => h("option", { value: m }, m)) : h("option", { value: "" }, "no model placed"));
    if (list.includes(keep)) modelSelect.value = keep;
  }

  function bubble(role, text) {
    const body = h("div", { class: "text" }, text);
    const el = h("div", { class: `msg ${role}`, "data-testid": `msg-${role}` }, h("div", { class: "role" }, role), body);
    transcript.append(el);
    transcript.scrollTop = transcript.scrollHeight;
    return body;
  }

  // Reasoning sits above the reply, collapsed: a <details> the reader may open.
  function reasoningBox(out) {
    const text = h("div", { class: "reasoning-text", "data-testid": "chat-reasoning-text" });
    const box = h("details", { class: "reasoning", "data-testid": "chat-reasoning" }, h("summary", {}, "Reasoning"), text);
    out.before(box);
    return text;
  }

  function toolCallCard(out, call) {
    let args = call.arguments;
    try { args = JSON.stringify(JSON.parse(call.arguments), null, 2); } catch { /* shown as sent */ }
    const card = h("div", { class: "tool-call", "data-testid": "chat-tool-call", "data-name": call.name },
      h("div", { class: "tool-call-head" }, h("span", { class: "badge" }, "tool call"), " ", h("span", { class: "mono" }, call.name), " ",
        h("span", { class: "muted mono" }, call.id)),
      h("pre", { class: "mono" }, args));
    out.after(card);
    return card;
  }

  function parsedTools() {
    const text = toolsInput.value.trim();
    if (!text) return [];
    const tools = JSON.parse(text);
    if (!Array.isArray(tools)) throw new Error("tools must be a JSON array");
    return tools;
  }

  async function send() {
    const text = input.value.trim();
    if (!text || controller || !modelSelect.value) return;
    input.value = "";
    history.push({ role: "user", content: text });
    bubble("user", text);
    const out = bubble("assistant", "");
    out.classList.add("streaming");
    controller = new AbortController();
    sendButton.disabled = true; stopButton.disabled = false;
    let reply = "";
    let reasoning = "";
    let reasoningText = null;
    let lastCard = out;
    const calls = [];
    replace(stats, "");
    try {
      const tools = parsedTools();
      const result = await streamChat({
        model: modelSelect.value, messages: history, maxTokens: Number(maxTokens.value) || undefined,
        temperature: temperature.value, signal: controller.signal, tools, toolChoice: toolChoice.value,
        onText: (delta) => { reply += delta; out.textContent = reply; transcript.scrollTop = transcript.scrollHeight; },
        onReasoning: (delta) => {
          reasoning += delta;
          if (!reasoningText) reasoningText = reasoningBox(out);
          reasoningText.textContent = reasoning;
        },
        onToolCall: (call) => {
          calls.push({ id: call.id, type: "function", function: { name: call.name, arguments: call.arguments } });
          lastCard = toolCallCard(lastCard, call);
        },
        onStats: (s) => replace(stats, `prompt ${s.prompt_tokens} tok @ ${s.prompt_tps.toFixed(0)} tok/s · generated ${s.generation_tokens} tok @ ${s.generation_tps.toFixed(1)} tok/s`
          + (s.draft_depth ? ` · draft depth ${s.draft_depth}, acceptance ${(100 * (s.acceptance_rate || 0)).toFixed(0)}%` : "")),
      });
      out.dataset.finish = result.finishReason || "";
      history.push(calls.length ? { role: "assistant", content: reply || null, tool_calls: calls } : { role: "assistant", content: reply || " " });
    } catch (err) {
      if (err.name === "AbortError") {
        out.dataset.finish = "aborted";
        history.push({ role: "assistant", content: reply || " " });
      } else {
        out.append(h("div", { class: "error", "data-testid": "chat-error" }, err instanceof ApiError ? `${err.code || err.status}: ${err.message}` : String(err)));
        history.pop();
      }
    } finally {
      out.classList.remove("streaming");
      out.dataset.done = "1";
      controller = null;
      sendButton.disabled = false; stopButton.disabled = true;
    }
  }

  replace(container, h("section", { class: "panel wide chat" },
    h("h2", {}, "Chat"),
    h("div", { class: "form-row" }, h("label", { for: "chat-model" }, "Model"), modelSelect,
      h("label", {}, "max tokens"), maxTokens, h("label", {}, "temperature"), temperature),
    h("details", { class: "tools-panel" }, h("summary", {}, "Tools"),
      h("div", { class: "form-row" }, h("label", {}, "tool choice"), toolChoice), toolsInput),
    transcript,
    h("div", { class: "composer" }, input, h("div", { class: "buttons" }, sendButton, stopButton)),
    stats));
  drawModels();
  const unsubscribe = subscribe(drawModels);
  return () => { unsubscribe(); if (controller) controller.abort(); };
}

export function notFound(container, { path }) {
  replace(container, h("section", { class: "panel" }, h("h2", {}, "Not found"),
    h("p", {}, `Nothing at ${path}. `, h("a", { href: "/", "data-link": true }, "Back to the cluster"), ".")));
  return () => {};
}
