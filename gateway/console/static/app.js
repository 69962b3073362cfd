// The console's shell: the router, the data client (session cookie + CSRF token), DOM helpers.
// Every text from the server goes into the page as a text node (h() below), never as HTML.

import overview from "./pages/overview.js";
import models from "./pages/models.js";
import workers from "./pages/workers.js";
import keys from "./pages/keys.js";
import usage from "./pages/usage.js";
import batches from "./pages/batches.js";
import playground from "./pages/playground.js";

const PAGES = { overview, models, workers, keys, usage, batches, playground };
const REFRESH_MS = 3000;
let session = null;
let timer = null;
let shown = null;

/** An element: h("a", {href: "#"}, "text", child, ...). Attributes starting with "on" are listeners. */
export function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "g", "path", "rect", "circle", "line", "text", "title", "polyline"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** A call to the console's data: JSON in and out; a change carries the session's CSRF token. */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = session ? session.csrf : "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch("/ui/api" + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "same-origin",
  });
  if (response.status === 401) { location.assign("/ui/login"); throw new ApiError(401, "signed out"); }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = data && data.error ? data.error.message || data.error : response.statusText;
    throw new ApiError(response.status, message);
  }
  return data;
}

export function say(text) { document.getElementById("status").textContent = text; }

export const fmt = {
  num(n, digits = 0) {
    if (n === null || n === undefined) return "–";
    return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  },
  ms(seconds) { return seconds === null || seconds === undefined ? "–" : `${fmt.num(seconds * 1000, seconds < 0.1 ? 1 : 0)} ms`; },
  when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "–"; },
  ago(ts, now = Date.now() / 1000) {
    if (!ts) return "–";
    const s = Math.max(0, now - ts);
    return s < 90 ? `${Math.round(s)} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
  },
};

/** A table: columns are [heading, row => cell content]. */
export function table(caption, columns, rows, empty = "None yet.") {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("table", {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, columns.map(([title]) => h("th", { scope: "col" }, title)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row)))))));
}

/** A button that copies text. */
export function copyButton(text, label) {
  const button = h("button", { type: "button", class: "small", "aria-label": label }, "Copy");
  button.addEventListener("click", async () => {
    await copy(text);
    button.textContent = "Copied";
  });
  return button;
}

/** The text to the clipboard (without a secure context, through a hidden textarea). */
async function copy(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = h("textarea", { class: "offscreen", "aria-hidden": "true" });
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

/** A modal question; resolves true when the user confirms. */
export function confirmDialog(question, confirmLabel) {
  return new Promise((resolve) => {
    const dialog = h("dialog", { "aria-label": question },
      h("p", {}, question),
      h("form", { method: "dialog" },
        h("button", { value: "cancel", type: "submit" }, "Cancel"),
        h("button", { value: "yes", type: "submit", class: "danger" }, confirmLabel)));
    dialog.addEventListener("close", () => { resolve(dialog.returnValue === "yes"); dialog.remove(); });
    document.body.append(dialog);
    dialog.showModal();
  });
}

// A refresh redraws the page: whoever works by keyboard keeps their place (the control they
// were on, found again by its label).
function nameOf(node) {
  return node.getAttribute("aria-label") || node.id || node.getAttribute("href") || node.textContent;
}

function focusKey(node, body) {
  return node && node !== body && body.contains(node) ? [node.tagName, nameOf(node)] : null;
}

function refocus(key, body) {
  if (!key || body.contains(document.activeElement)) return;
  const match = [...body.querySelectorAll(key[0])].find((node) => nameOf(node) === key[1]);
  if (match) match.focus({ preventScroll: true });
}

async function show() {
  const name = (location.hash.replace(/^#\/?/, "").split("?")[0]) || "overview";
  const page = PAGES[name] || overview;
  clearTimeout(timer);
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === `#/${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const main = document.getElementById("page");
  const view = { main, name, live: true };
  if (shown) shown.live = false;
  shown = view;
  main.replaceChildren(h("h1", {}, page.title));
  document.title = `${page.title} · embedq console`;
  const body = h("div", { class: "body" });
  main.append(body);
  await page.open(body, view);
  const tick = async () => {
    if (!view.live || !page.refresh) return;
    const focused = focusKey(document.activeElement, body);
    try { await page.refresh(body, view); say(""); } catch (error) { say(`Could not refresh: ${error.message}`); }
    refocus(focused, body);
    if (view.live) timer = setTimeout(tick, REFRESH_MS);
  };
  if (page.refresh) await tick();
}

async function start() {
  session = await api("/session");
  document.getElementById("signout").addEventListener("click", async () => {
    await fetch("/ui/logout", { method: "POST", headers: { "X-CSRF-Token": session.csrf }, credentials: "same-origin" });
    location.assign("/ui/login");
  });
  window.addEventListener("hashchange", show);
  await show();
}

export function currentSession() { return session; }

start().catch((error) => say(`The console could not start: ${error.message}`));
