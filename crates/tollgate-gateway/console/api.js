// The console's only way to the gateway: the same client (/v1) and operator (/internal) APIs any
// other client calls, with the secret the person typed in. The secret lives in sessionStorage
// (this tab only, gone when it closes) and is dropped by logOut.
//
// Every answer is parsed JSON or an ApiError carrying the API's own message and code, so pages
// can show what the gateway said. Money stays the decimal string the API sent: nothing here
// parses it into a number.

const ROLE_KEY = "tollgate.console.role";
const SECRET_KEY = "tollgate.console.secret";

/** An answer that is not a success: the HTTP status and the API's error object. */
export class ApiError extends Error {
  constructor(status, code, type, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.type = type;
  }
}

/** The logged-in role ("operator" or "customer") and its secret, or null. */
export function currentSession() {
  const role = sessionStorage.getItem(ROLE_KEY);
  const secret = sessionStorage.getItem(SECRET_KEY);
  if ((role === "operator" || role === "customer") && secret) {
    return { role, secret };
  }
  return null;
}

export function saveSession(role, secret) {
  sessionStorage.setItem(ROLE_KEY, role);
  sessionStorage.setItem(SECRET_KEY, secret);
}

export function logOut() {
  sessionStorage.removeItem(ROLE_KEY);
  sessionStorage.removeItem(SECRET_KEY);
}

/** `path?query`, leaving out parameters that are undefined, null or "". */
export function buildUrl(path, query) {
  const parameters = new URLSearchParams();
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") {
      parameters.set(name, String(value));
    }
  }
  const text = parameters.toString();
  return text ? `${path}?${text}` : path;
}

/** The API's error object from a failed response, whatever form the body took. */
async function errorFrom(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    // OpenAI shape {error: {message, type, code}}; Anthropic shape {type: "error", error: {type, message}}.
    if (body && body.error && typeof body.error.message === "string") {
      return new ApiError(response.status, body.error.code || body.error.type || "", body.error.type || "", body.error.message);
    }
  } catch {
    // Not JSON: fall through to the raw text.
  }
  const message = text.trim() || `${response.status} ${response.statusText}`;
  return new ApiError(response.status, "", "", message);
}

/** Sends one request with the given secret (default: the session's); throws ApiError on failure. */
async function send(method, path, { query, body, secret, accept } = {}) {
  const token = secret ?? currentSession()?.secret;
  const headers = { Accept: accept || "application/json" };
  if (token) {
    headers.Authorization = `Bearer ${token}`;
  }
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(buildUrl(path, query), init);
  } catch (error) {
    throw new ApiError(0, "network_error", "", `The gateway did not answer (${error.message}).`);
  }
  if (!response.ok) {
    throw await errorFrom(response);
  }
  return response;
}

/** A JSON request; resolves to the parsed body (null for an empty one). */
export async function request(method, path, options = {}) {
  const response = await send(method, path, options);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, query, options = {}) => request("GET", path, { ...options, query });
export const post = (path, body, options = {}) => request("POST", path, { ...options, body });
export const patch = (path, body, options = {}) => request("PATCH", path, { ...options, body });
export const remove = (path, options = {}) => request("DELETE", path, options);

/**
 * Fetches a file with the Authorization header (a plain link could not send it) and hands it to
 * the browser as a download. Resolves to the text, so callers can show or check what was saved.
 */
export async function download(path, query, filename) {
  const response = await send("GET", path, { query, accept: "text/csv" });
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  // Revoke later: the download reads the URL after this tick.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob.text();
}

/**
 * Every page of a cursor-paged list, up to pages_max pages: the rows joined, and whether more
 * were left.
 */
export async function getAllPages(path, query, pagesMax = 10) {
  const rows = [];
  let cursor = null;
  for (let page = 0; page < pagesMax; page += 1) {
    const body = await get(path, { ...query, cursor });
    rows.push(...(body.data || []));
    cursor = body.next_cursor ?? null;
    if (cursor === null) {
      return { rows, truncated: false, body };
    }
  }
  return { rows, truncated: true };
}
