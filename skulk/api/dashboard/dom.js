// A tiny DOM helper: h(tag, props, ...children) builds real elements.
//
// Why not a framework: the dashboard is a handful of panels fed by one polled
// JSON document; building elements directly keeps it dependency-free, with no
// build step, and readable by anyone who knows the DOM. Panels that hold user
// input (forms, the chat) are built once and updated in place; read-only
// panels are rebuilt from state with `replace`.

/**
 * Build an element. props: attributes, plus `on<Event>` handlers, `class`,
 * `dataset` (object) and `style` (string). Children: nodes, strings, numbers,
 * arrays (flattened), null/false (skipped).
 */
export function h(tag, props = {}, ...children) {
  const el = tag === "svg" || SVG_TAGS.has(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "value" && "value" in el) {
      el.value = value;
    } else if (key === "checked" && "checked" in el) {
      el.checked = Boolean(value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

const SVG_TAGS = new Set(["circle", "line", "g", "text", "rect", "title", "path"]);

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace the children of `container` with `children`. */
export function replace(container, ...children) {
  container.replaceChildren();
  append(container, children);
}

/** Human-readable bytes (GB with one decimal, MB below 1 GB). */
export function bytes(n) {
  if (n === null || n === undefined) return "?";
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)} GB`;
  return `${(n / 1e6).toFixed(0)} MB`;
}

/** The single key of a tagged union object and its body: {"RunnerReady": {...}} -> ["RunnerReady", {...}]. */
export function tagged(obj) {
  const keys = Object.keys(obj || {});
  return keys.length === 1 ? [keys[0], obj[keys[0]]] : ["Unknown", obj];
}
