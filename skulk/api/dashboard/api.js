// Talking to the node's API: JSON helpers and a streaming chat over fetch.
//
// Errors come back in the OpenAI envelope {"error": {message, type, param, code}};
// ApiError carries them so views can show the server's own words.

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
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

export async function getJSON(path) {
  return parse(await fetch(path, { headers: { accept: "application/json" } }));
}

export async function sendJSON(method, path, body) {
  return parse(await fetch(path, {
    method,
    headers: { "content-type": "application/json", accept: "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  }));
}

/**
 * Stream a chat completion. Calls onText(delta) per content chunk, onStats(obj)
 * for the `: generation_stats` comment, onCommand(id) for `: command_id`.
 * Resolves with {finishReason, usage}; rejects with ApiError on an HTTP error
 * or an in-band error event. `signal` aborts (the server then abandons the request).
 */
export async function streamChat({ model, messages, maxTokens, temperature, signal, onText, onStats, onCommand }) {
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (maxTokens) body.max_tokens = maxTokens;
  if (temperature !== undefined && temperature !== null && temperature !== "") body.temperature = Number(temperature);
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", accept: "text/event-stream" },
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
            if (choice.delta && choice.delta.content) onText(choice.delta.content);
            if (choice.finish_reason) finishReason = choice.finish_reason;
          }
        }
      }
    }
  }
  return { finishReason, usage };
}
