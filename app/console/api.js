// The one way the console talks to the server: the same JSON API users call, with the keys a
// person typed (kept in this tab's sessionStorage), and errors carrying the API's own message.
// Also the one DOM helper: text always goes in as text nodes, never as HTML.

const API_KEY = "tlserve.apiKey";
const ADMIN_KEY = "tlserve.adminKey";

// The API is served beside /ui/ (so a path prefix added by a proxy still works).
const BASE = new URL("../", window.location.href);

export function getKeys() {
  return { api: sessionStorage.getItem(API_KEY) || "", admin: sessionStorage.getItem(ADMIN_KEY) || "" };
}

export function setKeys(api, admin) {
  for (const [name, value] of [[API_KEY, api], [ADMIN_KEY, admin]]) {
    if (value) sessionStorage.setItem(name, value);
    else sessionStorage.removeItem(name);
  }
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  describe() {
    const head = this.status ? `Error ${this.status}${this.code ? ` (${this.code})` : ""}` : "Error";
    return `${head}: ${this.message}`;
  }
}

function errorOf(response, data, text) {
  const e = data && typeof data === "object" ? data.error : null;
  if (e && typeof e === "object" && typeof e.message === "string") return new ApiError(response.status, String(e.code || ""), e.message);
  if (typeof e === "string") return new ApiError(response.status, "", e);
  const body = text.trim().slice(0, 300);
  return new ApiError(response.status, "", `${response.statusText || "HTTP error"}${body ? `: ${body}` : ""}`);
}

// call("GET", "v1/models") → the parsed JSON body, or throws ApiError. `admin`: send the admin key.
export async function call(method, path, { json, form, admin = false } = {}) {
  const keys = getKeys();
  const key = admin ? keys.admin || keys.api : keys.api || keys.admin;
  const headers = { Accept: "application/json" };
  if (key) headers["X-API-Key"] = key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(new URL(path, BASE), { method, headers, body, credentials: "omit", cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, "network_error", `the server did not answer (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = errorOf(response, data, text);
    if (admin && (response.status === 401 || response.status === 403)) askForAdminKey();
    throw error;
  }
  return data;
}

// A photo behind an admin key (an <img> cannot send one): its bytes as a Blob, or throws ApiError.
export async function photo(where) {
  const keys = getKeys();
  const key = keys.admin || keys.api;
  const response = await fetch(new URL(where, BASE), { headers: key ? { "X-API-Key": key } : {}, credentials: "omit", cache: "no-store" });
  if (!response.ok) throw new ApiError(response.status, "", `the photo could not be read (${response.status})`);
  return response.blob();
}

// An admin operation was refused: point the person at the admin key field (the error says why beside the button).
function askForAdminKey() {
  const field = document.getElementById("admin-key");
  if (!field) return;
  field.setAttribute("aria-invalid", "true");
  field.placeholder = "paste the admin key here";
  field.focus();
}

export function path(template, ...parts) {
  // path`v1/heads/${name}/versions`: every interpolated part is URL-encoded.
  return template.reduce((out, piece, i) => out + piece + (i < parts.length ? encodeURIComponent(String(parts[i])) : ""), "");
}

// el("p", {class: "x", "aria-label": "y"}, "text", child…): attributes by setAttribute, children as
// nodes or text nodes. Event handlers are attached with addEventListener by the caller, never as attributes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) throw new Error("event handlers are attached with addEventListener");
    node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function show(target, ...children) {
  target.replaceChildren();
  append(target, children);
}

export function showStatus(target, message, kind = "") {
  target.classList.remove("ok", "error");
  target.classList.add("status", ...(kind ? [kind] : []));
  target.setAttribute("role", "status");
  target.textContent = message;
}

export function showError(target, err) {
  target.classList.remove("ok");
  target.classList.add("status", "error");
  target.setAttribute("role", "alert");
  target.textContent = err instanceof ApiError ? err.describe() : `Error: ${err && err.message ? err.message : err}`;
}

export function percent(x) {
  return typeof x === "number" ? `${(100 * x).toFixed(1)}%` : "–";
}

// Photos dropped on `zone` or picked in its file input go to onFiles(File[]).
export function dropZone(zone, input, onFiles) {
  input.addEventListener("change", () => {
    const files = Array.from(input.files || []);
    if (files.length) onFiles(files);
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = Array.from((event.dataTransfer && event.dataTransfer.files) || []);
    if (files.length) onFiles(files);
  });
}

// Other parts ask for the head list to be read again (after a training, a promotion, new keys).
export function headsChanged() {
  document.dispatchEvent(new CustomEvent("tlserve:heads-changed"));
}
