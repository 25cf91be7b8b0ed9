// Talking to the node's API: JSON helpers and a streaming chat over fetch.
//
// Errors come back in the OpenAI envelope {"error": {message, type, param, code}};
// ApiError carries them so views can show the server's own words.
//
// API keys: a node started with SKULK_API_KEYS answers 401 without one. The key is
// asked for once (app.js shows the form on the "skulk:needs-key" event) and kept in
// this browser's localStorage; every request sends it as "Authorization: Bearer".

const KEY_STORAGE = "skulk.apiKey";

export function apiKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lasts for this page only */ }
}

function withKey(headers) {
  const key = apiKey();
  return key ? { ...headers, authorization: `Bearer ${key}` } : headers;
}

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
  }
}

async function parse(response) {
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { error: { message: text } }; }
  if (response.status === 401) window.dispatchEvent(new CustomEvent("skulk:needs-key", { detail: { hadKey: !!apiKey() } }));
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

export async function getJSON(path) {
  return parse(await fetch(path, { headers: withKey({ accept: "application/json" }) }));
}

export async function sendJSON(method, path, body) {
  return parse(await fetch(path, {
    method,
    headers: withKey({ "content-type": "application/json", accept: "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
  }));
}

/**
 * Stream a chat completion. Calls onText(delta) per content chunk, onReasoning(delta)
 * per reasoning chunk, onToolCall(call) per tool call ({id, name, arguments}),
 * onStats(obj) for the `: generation_stats` comment, onCommand(id) for `: command_id`.
 * Resolves with {finishReason, usage}; rejects with ApiError on an HTTP error
 * or an in-band error event. `signal` aborts (the server then abandons the request).
 */
export async function streamChat({ model, messages, maxTokens, temperature, tools, toolChoice, signal, onText, onReasoning, onToolCall, onStats, onCommand }) {
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (tools && tools.length) { body.tools = tools; body.tool_choice = toolChoice || "auto"; }
  if (maxTokens) body.max_tokens = maxTokens;
  if (temperature !== undefined && temperature !== null && temperature !== "") body.temperature = Number(temperature);
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: withKey({ "content-type": "application/json", accept: "text/event-stream" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) await parse(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finishReason = null;
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith(": command_id ")) onCommand && onCommand(line.slice(13).trim());
        else if (line.startsWith(": generation_stats ")) onStats && onStats(JSON.parse(line.slice(19)));
        else if (line.startsWith("data: ")) {
          const data = line.slice(6);
          if (data === "[DONE]") return { finishReason, usage };
          const event = JSON.parse(data);
          if (event.error) throw new ApiError(200, event);
          if (event.usage) usage = event.usage;
          for (const choice of event.choices || []) {
            const delta = choice.delta || {};
            if (delta.reasoning_content && onReasoning) onReasoning(delta.reasoning_content);
            if (delta.content) onText(delta.content);
            for (const call of delta.tool_calls || []) {
              if (onToolCall) onToolCall({ id: call.id, name: call.function.name, arguments: call.function.arguments });
            }
            if (choice.finish_reason) finishReason = choice.finish_reason;
          }
        }
      }
    }
  }
  return { finishReason, usage };
}
