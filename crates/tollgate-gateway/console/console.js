// The Tollgate console: a hash-routed page over the client and operator APIs.
//
// Map: the DOM helpers (h, tables, cards, forms); formatting (money as the API's string, times);
// the shell (session, navigation, banner, router); the login page; the operator pages (accounts,
// one account, prices, operations); the customer pages (overview, usage, statement, keys).
//
// Rules kept throughout: API data reaches the page only as text nodes or attribute values, never
// as markup; money is shown exactly as the API's decimal string and never computed with; every
// API error is shown in the banner (or next to the login form) with the API's own message.

import * as api from "./api.js";
import { stackedBarChart } from "./charts.js";

// --- DOM helpers ------------------------------------------------------------------------------

/**
 * Makes an element. Properties: class, test (data-test), dataset, on<event> handlers, value and
 * checked (as properties), anything else as an attribute. Children: nodes or text (strings and
 * numbers become text nodes); null, undefined and false are left out.
 */
function h(tag, properties = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(properties)) {
    if (value === undefined || value === null || value === false) {
      continue;
    }
    if (name === "class") {
      node.className = value;
    } else if (name === "test") {
      node.dataset.test = value;
    } else if (name === "dataset") {
      Object.assign(node.dataset, value);
    } else if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "value" || name === "checked") {
      node[name] = value;
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(node, children);
  return node;
}

function append(node, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

function replaceChildren(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

const dash = () => h("span", { class: "muted" }, "—");

/** Money: the API's decimal string, as sent, in monospace. */
function money(value, test) {
  if (value === null || value === undefined) {
    return dash();
  }
  return h("span", { class: "money", test }, value);
}

/** An id or other machine string, monospace. */
const mono = (value) => (value === null || value === undefined || value === "" ? dash() : h("span", { class: "mono" }, String(value)));

/** A long id cut in the middle for a narrow column; the whole id in the tooltip. */
function shortId(value) {
  if (!value) {
    return dash();
  }
  const text = String(value);
  return h("span", { class: "mono", title: text }, text.length > 20 ? `${text.slice(0, 11)}…${text.slice(-4)}` : text);
}

const integerFormat = new Intl.NumberFormat("en-US");
/** A count (requests, tokens: never money). */
const count = (value) => (value === null || value === undefined ? dash() : integerFormat.format(value));

/** "2026-12-04T18:20:52.984Z" → "2026-12-04 18:20:52" (UTC), the full value in the tooltip. */
function time(iso) {
  if (!iso) {
    return dash();
  }
  const text = String(iso).replace("T", " ").replace(/(\.\d+)?(Z|[+-]00:00)$/, "");
  return h("time", { datetime: iso, title: iso }, text);
}

/** The date alone (UTC), the full value in the tooltip: for narrow columns. */
function date(iso) {
  return iso ? h("time", { datetime: iso, title: iso }, String(iso).slice(0, 10)) : dash();
}

function badge(text, kind) {
  return h("span", { class: `badge badge-${kind || text}`, test: "badge" }, text);
}

const statusBadge = (status) => badge(status, { active: "good", suspended: "bad", revoked: "bad", confirmed: "good", pending: "warn", delivered: "good", failed: "bad", success: "good" }[status] || "neutral");

/**
 * A table. columns: [{label, numeric, field, cell(row) → node or text}]. Options: test (the
 * table's data-test), row(row) → extra properties for each <tr>, empty (the text with no rows).
 */
function table(columns, rows, { test, row, empty = "Nothing yet." } = {}) {
  const head = h("thead", {}, h("tr", {}, columns.map((column) => h("th", { class: column.numeric ? "numeric" : null, scope: "col" }, column.label))));
  const body = h("tbody");
  if (rows.length === 0) {
    body.append(h("tr", { class: "empty-row" }, h("td", { colspan: columns.length }, empty)));
  }
  for (const item of rows) {
    const properties = row ? row(item) : {};
    body.append(h("tr", properties, columns.map((column) => h("td", { class: column.numeric ? "numeric" : null, dataset: column.field ? { field: column.field } : undefined }, column.cell(item)))));
  }
  return h("div", { class: "table-wrap" }, h("table", { class: "data", test }, head, body));
}

/** A titled card; actions go on the right of the title. */
function card(title, { actions, test, id, wide } = {}, ...body) {
  return h("section", { class: wide ? "card card-wide" : "card", test, id },
    h("header", { class: "card-header" }, h("h2", {}, title), actions ? h("div", { class: "card-actions" }, actions) : null),
    body);
}

/** A section whose content is loaded: shows "Loading…", then what load() returned, or the error. */
async function loadInto(container, load) {
  container.dataset.state = "loading";
  replaceChildren(container, h("p", { class: "loading" }, "Loading…"));
  try {
    const content = await load();
    replaceChildren(container, content);
    container.dataset.state = "ready";
  } catch (error) {
    replaceChildren(container, h("p", { class: "load-error" }, "Could not load this part: ", error.message));
    container.dataset.state = "error";
    // A section of a page already left says nothing on the next one.
    if (container.isConnected) {
      showError(error);
    }
  }
}

function stat(label, value, id, note) {
  return h("div", { class: "stat", test: "stat" },
    h("div", { class: "stat-label" }, label),
    h("div", { class: "stat-value", id }, value),
    note ? h("div", { class: "stat-note" }, note) : null);
}

function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", { class: "field-label" }, label), input, hint ? h("span", { class: "field-hint" }, hint) : null);
}

function input(id, properties = {}) {
  return h("input", { id, name: id, autocomplete: "off", spellcheck: "false", ...properties });
}

function button(label, properties = {}) {
  return h("button", { type: "button", class: "button", ...properties }, label);
}

/** Disables a button while an action runs; errors go to the banner. Resolves to the result or undefined. */
async function busy(control, action) {
  control.disabled = true;
  control.setAttribute("aria-busy", "true");
  try {
    return await action();
  } catch (error) {
    showError(error);
    return undefined;
  } finally {
    control.disabled = false;
    control.removeAttribute("aria-busy");
  }
}

/** Replaces a cell's content by a question with Yes/Cancel until one is chosen. */
function confirmInline(cell, question, yesLabel, onYes) {
  const previous = [...cell.childNodes];
  const restore = () => replaceChildren(cell, previous);
  const yes = button(yesLabel, { class: "button button-danger button-small", test: "confirm-yes" });
  yes.addEventListener("click", async () => {
    await busy(yes, onYes);
    restore();
  });
  replaceChildren(cell, h("span", { class: "confirm" }, h("span", { class: "confirm-question" }, question), yes,
    button("Cancel", { class: "button button-quiet button-small", test: "confirm-cancel", onclick: restore })));
  yes.focus();
}

/** A reference id no one used before: the kind, the UTC date and random hex. */
function freshReference(kind) {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  const hex = [...bytes].map((byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${kind}-${new Date().toISOString().slice(0, 10).replaceAll("-", "")}-${hex}`;
}

// --- periods ----------------------------------------------------------------------------------

const DAY_MS = 86_400_000;
const PERIODS = [7, 30, 90];
/** The period the usage and statement views show, in days ending today (UTC); kept across pages. */
let periodDays = 30;

const rfc3339 = (ms) => new Date(ms).toISOString().replace(".000Z", "Z");

/** [start, end) of the last `days` UTC days, today included, and each day's date. */
function periodRange(days) {
  const now = new Date();
  const end = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() + 1);
  const start = end - days * DAY_MS;
  const dates = [];
  for (let day = start; day < end; day += DAY_MS) {
    dates.push(new Date(day).toISOString().slice(0, 10));
  }
  return { start: rfc3339(start), end: rfc3339(end), dates, days };
}

function periodSelect(onChange) {
  const select = h("select", { id: "period", test: "period", "aria-label": "Period" },
    PERIODS.map((days) => h("option", { value: String(days), selected: days === periodDays }, `Last ${days} days`)));
  select.addEventListener("change", () => {
    periodDays = Number(select.value);
    onChange(periodRange(periodDays));
  });
  return select;
}

// --- the shell: session, navigation, banner, router ------------------------------------------

const main = () => document.getElementById("main");

function showError(error) {
  const banner = document.getElementById("banner");
  const code = error.code ? ` (${error.code}${error.status ? `, HTTP ${error.status}` : ""})` : "";
  document.getElementById("banner-text").textContent = `${error.message}${code}`;
  banner.dataset.code = error.code || "";
  banner.hidden = false;
}

function clearError() {
  document.getElementById("banner").hidden = true;
  document.getElementById("banner-text").textContent = "";
}

function showNotice(...content) {
  const notice = document.getElementById("notice");
  replaceChildren(notice, content);
  notice.hidden = false;
}

function clearNotice() {
  const notice = document.getElementById("notice");
  notice.hidden = true;
  notice.replaceChildren();
}

const NAVIGATION = {
  operator: [["#/accounts", "Accounts", "nav-accounts"], ["#/prices", "Prices", "nav-prices"], ["#/operations", "Operations", "nav-operations"]],
  customer: [["#/me", "Overview", "nav-overview"], ["#/me/usage", "Usage", "nav-usage"], ["#/me/statement", "Statement", "nav-statement"], ["#/me/keys", "Keys", "nav-keys"]],
};

function renderNavigation(path) {
  const session = api.currentSession();
  const links = document.getElementById("nav-links");
  links.replaceChildren();
  document.getElementById("layout").classList.toggle("logged-out", !session);
  document.getElementById("logout").hidden = !session;
  document.getElementById("nav-role").textContent = session ? (session.role === "operator" ? "Operator" : "Customer") : "";
  if (!session) {
    return;
  }
  for (const [href, label, test] of NAVIGATION[session.role]) {
    const target = href.slice(1);
    const active = target === "/me" ? path === "/me" : path === target || path.startsWith(`${target}/`);
    links.append(h("li", {}, h("a", { href, test, class: active ? "active" : null, "aria-current": active ? "page" : null }, label)));
  }
}

const ROUTES = [
  { pattern: /^\/login$/, role: null, render: renderLogin },
  { pattern: /^\/accounts$/, role: "operator", render: renderAccounts },
  { pattern: /^\/accounts\/([^/]+)$/, role: "operator", render: renderAccount },
  { pattern: /^\/prices$/, role: "operator", render: renderPrices },
  { pattern: /^\/operations$/, role: "operator", render: renderOperations },
  { pattern: /^\/me$/, role: "customer", render: renderCustomerOverview },
  { pattern: /^\/me\/usage$/, role: "customer", render: renderCustomerUsage },
  { pattern: /^\/me\/statement$/, role: "customer", render: renderCustomerStatement },
  { pattern: /^\/me\/keys$/, role: "customer", render: renderCustomerKeys },
];

const homeFor = (session) => (session ? (session.role === "operator" ? "#/accounts" : "#/me") : "#/login");

/** The hash as a path and its query: "#/accounts?q=acme" → ["/accounts", {q: "acme"}]. */
function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = hash.split("?");
  return [path, Object.fromEntries(new URLSearchParams(query))];
}

function route() {
  const session = api.currentSession();
  const [path, query] = parseHash();
  const match = ROUTES.map((candidate) => [candidate, path.match(candidate.pattern)]).find(([, found]) => found);
  // Wrong role, no session, or an unknown page: to the home of whoever is logged in.
  if (!match || (match[0].role && match[0].role !== session?.role) || (!match[0].role && session)) {
    const home = homeFor(session);
    if (location.hash !== home) {
      location.replace(home);
      return;
    }
  }
  if (!match) {
    return;
  }
  const [{ render }, groups] = match;
  clearError();
  clearNotice();
  renderNavigation(path);
  const page = h("div", { class: "page", test: `page-${path.split("/")[1] || "home"}` });
  replaceChildren(main(), page);
  document.title = "Tollgate console";
  render(page, ...groups.slice(1).map(decodeURIComponent), query);
}

function start() {
  document.getElementById("banner-close").addEventListener("click", clearError);
  document.getElementById("logout").addEventListener("click", () => {
    api.logOut();
    location.hash = "#/login";
  });
  window.addEventListener("hashchange", route);
  route();
}

// --- login ------------------------------------------------------------------------------------

function renderLogin(page) {
  document.title = "Log in · Tollgate console";
  const error = h("p", { class: "login-error", id: "login-error", test: "login-error", role: "alert", hidden: true });
  const secret = input("login-secret", { type: "password", required: true, autocomplete: "off" });
  const secretLabel = h("span", { class: "field-label" }, "Admin token");
  const hint = h("span", { class: "field-hint" }, "TOLLGATE_ADMIN_TOKEN. Kept in this tab only (sessionStorage) until you log out.");
  const roleChoice = (role, label) => h("label", { class: "choice" },
    h("input", { type: "radio", name: "role", value: role, id: `login-role-${role}`, test: `login-role-${role}`, checked: role === "operator" }), label);
  const submit = h("button", { type: "submit", class: "button button-primary", id: "login-submit" }, "Log in");
  const form = h("form", { class: "login-form", id: "login-form", novalidate: true },
    h("fieldset", { class: "choices" }, h("legend", {}, "Log in as"),
      roleChoice("operator", "Operator (admin token)"), roleChoice("customer", "Customer (API key)")),
    h("label", { class: "field" }, secretLabel, secret, hint),
    submit, error);
  form.addEventListener("change", () => {
    const operator = form.elements.role.value === "operator";
    secretLabel.textContent = operator ? "Admin token" : "API key";
    hint.textContent = operator
      ? "TOLLGATE_ADMIN_TOKEN. Kept in this tab only (sessionStorage) until you log out."
      : "A key Tollgate issued (tg_…). Kept in this tab only (sessionStorage) until you log out.";
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    const role = form.elements.role.value;
    const value = secret.value.trim();
    if (!value) {
      error.textContent = role === "operator" ? "Enter the admin token." : "Enter an API key.";
      error.hidden = false;
      return;
    }
    submit.disabled = true;
    try {
      // The same call the first page makes, so a secret that logs in can also use the pages.
      if (role === "operator") {
        await api.get("/internal/accounts", { limit: 1 }, { secret: value });
      } else {
        await api.get("/v1/balance", {}, { secret: value });
      }
      api.saveSession(role, value);
      location.hash = homeFor({ role });
    } catch (failure) {
      // With internal_listen set, /internal is served on that listener only and /v1 on the
      // public one: a 404 here means this is the other listener.
      const elsewhere = failure.status === 404
        ? ` This listener does not serve ${role === "operator" ? "the operator API: open the console on the internal listener (internal_listen)" : "the client API: open the console on the public listener"}.`
        : "";
      error.textContent = `${failure.message}${elsewhere}`;
      error.dataset.code = failure.code || "";
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });
  append(page, h("div", { class: "login" },
    h("div", { class: "login-card" },
      h("h1", {}, "Tollgate console"),
      h("p", { class: "muted" }, "Operators manage accounts, keys, funds and prices; customers see their balance, usage and statement."),
      form)));
  secret.focus();
}

// --- operator: accounts -----------------------------------------------------------------------

const ACCOUNTS_PAGE_SIZE = 25;

function accountLink(id) {
  return h("a", { href: `#/accounts/${encodeURIComponent(id)}`, class: "mono", test: "account-link" }, id);
}

function renderAccounts(page, query) {
  document.title = "Accounts · Tollgate console";
  const listing = h("div", { id: "accounts-list", test: "accounts-list" });
  const search = input("accounts-search", { type: "search", placeholder: "Search by id or name", value: query.q || "", "aria-label": "Search accounts" });
  // Cursors of the pages before this one, for "Previous"; the first page has cursor null.
  let cursors = [null];
  let timer = null;

  const load = () => loadInto(listing, async () => {
    const q = search.value.trim();
    const cursor = cursors[cursors.length - 1];
    const body = await api.get("/internal/accounts", { q, limit: ACCOUNTS_PAGE_SIZE, cursor });
    const columns = [
      { label: "ID", field: "id", cell: (account) => accountLink(account.id) },
      { label: "Name", field: "name", cell: (account) => account.name },
      { label: "Tier", field: "customer_type", cell: (account) => account.customer_type },
      { label: "Kind", field: "kind", cell: (account) => account.kind },
      { label: "Status", field: "status", cell: (account) => statusBadge(account.status) },
      { label: "Balance", field: "balance", numeric: true, cell: (account) => money(account.balance) },
      { label: "Held", field: "held", numeric: true, cell: (account) => money(account.held) },
      { label: "Available", field: "available", numeric: true, cell: (account) => money(account.available) },
    ];
    const previous = button("← Previous", { class: "button button-small", id: "accounts-previous", disabled: cursors.length === 1 });
    previous.addEventListener("click", () => { cursors = cursors.slice(0, -1); load(); });
    const next = button("Next →", { class: "button button-small", id: "accounts-next", disabled: body.next_cursor === null || body.next_cursor === undefined });
    next.addEventListener("click", () => { cursors = [...cursors, body.next_cursor]; load(); });
    return [
      table(columns, body.data, { test: "accounts-table", row: (account) => ({ test: "account-row", dataset: { id: account.id } }), empty: q ? `No account matches “${q}”.` : "No accounts yet." }),
      h("div", { class: "pager" }, previous, h("span", { class: "muted" }, `Page ${cursors.length}`), next),
    ];
  });

  const runSearch = () => {
    clearTimeout(timer);
    cursors = [null];
    const q = search.value.trim();
    // Keep the search in the address (without a hashchange, which would render the page again).
    history.replaceState(null, "", q ? `#/accounts?q=${encodeURIComponent(q)}` : "#/accounts");
    load();
  };
  search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(runSearch, 300); });
  const searchForm = h("form", { class: "search", id: "accounts-search-form", role: "search" }, search,
    h("button", { type: "submit", class: "button", id: "accounts-search-submit" }, "Search"));
  searchForm.addEventListener("submit", (event) => { event.preventDefault(); runSearch(); });

  const form = newAccountForm(() => { cursors = [null]; load(); });
  const toggle = button("New account", { class: "button button-primary", id: "new-account-toggle", "aria-expanded": "false" });
  toggle.addEventListener("click", () => {
    form.hidden = !form.hidden;
    toggle.setAttribute("aria-expanded", String(!form.hidden));
    if (!form.hidden) {
      form.querySelector("#new-account-name").focus();
    }
  });

  append(page,
    h("header", { class: "page-header" }, h("h1", {}, "Accounts"), toggle),
    form,
    card("All accounts", { actions: searchForm }, listing));
  load();
}

function newAccountForm(onCreated) {
  const tiers = h("datalist", { id: "known-tiers" });
  // The tiers that have prices, as suggestions; any name is allowed.
  api.get("/internal/prices").then((body) => {
    for (const tier of [...new Set(body.data.map((price) => price.customer_type))].sort()) {
      tiers.append(h("option", { value: tier }));
    }
  }).catch(() => {});
  const submit = h("button", { type: "submit", class: "button button-primary", id: "new-account-submit" }, "Create account");
  const form = h("form", { class: "card form-card", id: "new-account-form", test: "new-account-form", hidden: true },
    h("h2", {}, "New account"),
    h("div", { class: "form-grid" },
      field("ID (optional)", input("new-account-id", { placeholder: "generated when empty" }), "Letters, digits, - and _."),
      field("Name", input("new-account-name", { required: true })),
      field("Kind", h("select", { id: "new-account-kind", name: "kind" }, h("option", { value: "user" }, "user"), h("option", { value: "tenant" }, "tenant"))),
      field("Tier (customer type)", input("new-account-tier", { value: "standard", list: "known-tiers", required: true }), "Prices are per tier.")),
    tiers,
    h("div", { class: "form-actions" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      name: form.querySelector("#new-account-name").value.trim(),
      kind: form.querySelector("#new-account-kind").value,
      customer_type: form.querySelector("#new-account-tier").value.trim(),
    };
    const id = form.querySelector("#new-account-id").value.trim();
    if (id) {
      body.id = id;
    }
    const created = await busy(submit, () => api.post("/internal/accounts", body));
    if (created) {
      form.reset();
      form.hidden = true;
      showNotice("Account ", accountLink(created.id), ` (${created.name}) created.`);
      onCreated(created);
    }
  });
  return form;
}

// --- operator: one account --------------------------------------------------------------------

function renderAccount(page, accountId) {
  document.title = `${accountId} · Tollgate console`;
  const path = `/internal/accounts/${encodeURIComponent(accountId)}`;
  const header = h("header", { class: "page-header" }, h("h1", {}, accountId));
  const stats = h("div", { class: "stats", id: "account-stats", test: "account-stats" });
  const usage = h("div", { test: "account-usage" });
  const byModel = h("div", { test: "account-by-model" });
  const keys = h("div", { test: "account-keys" });
  const statement = h("div", { test: "account-statement" });
  let range = periodRange(periodDays);

  const loadAccount = () => loadInto(stats, async () => {
    const account = await api.get(path);
    renderAccountHeader(header, account, loadAccount);
    return accountStats(account);
  });
  const loadUsage = () => {
    loadInto(usage, () => usageChart("/internal/billing/summary", { account_id: accountId }, range, usage));
    loadInto(byModel, () => summaryTable("/internal/billing/summary", { account_id: accountId, group_by: "model" }, range, "account-by-model-table"));
  };
  const loadKeys = () => loadInto(keys, () => keysTable(`${path}/keys`, true, loadKeys));
  const loadStatement = () => loadInto(statement, () => statementView(`${path}/statement`, range));
  const afterFunds = () => { loadAccount(); loadStatement(); };

  append(page,
    h("p", { class: "breadcrumb" }, h("a", { href: "#/accounts" }, "← Accounts")),
    header,
    stats,
    h("div", { class: "toolbar" }, h("span", { class: "muted" }, "Usage and statement period (UTC):"),
      periodSelect((next) => { range = next; loadUsage(); loadStatement(); })),
    h("div", { class: "columns" },
      h("div", { class: "column-main" }, card("Usage by day and model", { test: "usage-card" }, usage)),
      h("div", { class: "column-side" }, fundsCard(accountId, afterFunds))),
    card("Usage by model", {}, byModel),
    card("Keys", { test: "keys-card", actions: createKeyToggle() }, createKeyForm(accountId, loadKeys), keys),
    card("Statement", { test: "statement-card", actions: csvButton(`${path}/statement`, () => range, `statement-${accountId}`) }, statement));
  loadAccount();
  loadUsage();
  loadKeys();
  loadStatement();
}

function renderAccountHeader(header, account, reload) {
  const suspended = account.status === "suspended";
  const toggle = button(suspended ? "Activate" : "Suspend", { class: suspended ? "button" : "button button-danger", id: "account-status-toggle", test: "account-status-toggle" });
  const holder = h("div", { class: "page-header-actions" }, toggle);
  const setStatus = async () => {
    await api.patch(`/internal/accounts/${encodeURIComponent(account.id)}`, { status: suspended ? "active" : "suspended" });
    showNotice(`Account ${account.id} is now ${suspended ? "active" : "suspended"}.`);
    reload();
  };
  toggle.addEventListener("click", () => {
    if (suspended) {
      busy(toggle, setStatus);
    } else {
      confirmInline(holder, "Suspend: its keys are refused until it is activated again.", "Suspend", setStatus);
    }
  });
  replaceChildren(header,
    h("div", {},
      h("h1", {}, account.name, " ", h("span", { class: "mono muted title-id", id: "account-id" }, account.id)),
      h("div", { class: "badges" }, h("span", { id: "account-status", dataset: { status: account.status } }, statusBadge(account.status)), badge(`tier ${account.customer_type}`, "neutral"), badge(account.kind, "neutral"))),
    holder);
}

function quotaNote(quota) {
  return quota === null || quota === undefined ? "no quota" : `of a quota of ${count(quota)}`;
}

function accountStats(account) {
  return [
    stat("Balance", money(account.balance), "account-balance"),
    stat("Held", money(account.held), "account-held", "reserved by requests in flight"),
    stat("Available", money(account.available), "account-available", account.credit_limit && account.credit_limit !== "0" ? ["credit limit ", money(account.credit_limit)] : null),
    stat("Ledger balance", money(account.ledger_balance), "account-ledger-balance", "as the ledger's rows hold it"),
    stat("Requests today", count(account.daily_requests_used), "account-daily-requests", quotaNote(account.daily_request_quota)),
    stat("Requests this month", count(account.monthly_requests_used), "account-monthly-requests", quotaNote(account.monthly_request_quota)),
  ];
}

// --- usage: chart and summary tables (operator and customer) ---------------------------------

/** Every row of a summary over the period, following next_cursor. */
async function summaryRows(path, query, range) {
  const { rows } = await api.getAllPages(path, { ...query, start: range.start, end: range.end, limit: 100 });
  return rows;
}

/**
 * The stacked chart of cost per day by model, from summary?group_by=day,model (and =day for
 * totals), drawn at the width of its holder so that its text keeps its size.
 */
async function usageChart(path, query, range, holder) {
  const [segments, days] = await Promise.all([
    summaryRows(path, { ...query, group_by: "day,model" }, range),
    summaryRows(path, { ...query, group_by: "day" }, range),
  ]);
  const models = [...new Set(segments.map((row) => row.model))].sort();
  const totals = Object.fromEntries(days.map((row) => [row.day ?? row.group, row.cost]));
  return h("div", { class: "chart-box" }, stackedBarChart({
    title: `Cost per day by model, last ${range.days} days`,
    categories: range.dates,
    series: models,
    segments: segments.map((row) => ({ category: row.day, series: row.model, value: row.cost, detail: `${count(row.requests)} requests` })),
    totals,
    valueLabel: "cost",
    categoryLabel: "day (UTC)",
    width: Math.max(480, Math.floor(holder.clientWidth || 760)),
  }));
}

const DIMENSIONS = {
  day: { label: "Day", cell: (row) => mono(row.day) },
  model: { label: "Model", cell: (row) => mono(row.model) },
  key: { label: "Key", cell: (row) => mono(row.api_key_id) },
};

function summaryColumns(groupBy) {
  return [
    ...groupBy.split(",").map((dimension) => ({ ...DIMENSIONS[dimension], field: dimension })),
    { label: "Requests", field: "requests", numeric: true, cell: (row) => count(row.requests) },
    { label: "Input tokens", field: "input_tokens", numeric: true, cell: (row) => count(row.input_tokens) },
    { label: "Cached input", field: "cached_input_tokens", numeric: true, cell: (row) => count(row.cached_input_tokens) },
    { label: "Cache write", field: "cache_write_tokens", numeric: true, cell: (row) => count(row.cache_write_tokens) },
    { label: "Output tokens", field: "output_tokens", numeric: true, cell: (row) => count(row.output_tokens) },
    { label: "Cost", field: "cost", numeric: true, cell: (row) => money(row.cost) },
  ];
}

/** One page of a summary, with Previous/Next over next_cursor. */
async function summaryTable(path, query, range, test) {
  const holder = h("div", { test, dataset: { start: range.start, end: range.end } });
  const cursors = [null];
  const show = async () => {
    const body = await api.get(path, { ...query, start: range.start, end: range.end, limit: 50, cursor: cursors[cursors.length - 1] });
    const previous = button("← Previous", { class: "button button-small", disabled: cursors.length === 1 });
    previous.addEventListener("click", () => busy(previous, () => { cursors.pop(); return show(); }));
    const next = button("Next →", { class: "button button-small", disabled: body.next_cursor === null || body.next_cursor === undefined });
    next.addEventListener("click", () => busy(next, () => { cursors.push(body.next_cursor); return show(); }));
    const pager = cursors.length > 1 || body.next_cursor ? h("div", { class: "pager" }, previous, h("span", { class: "muted" }, `Page ${cursors.length}`), next) : null;
    replaceChildren(holder,
      table(summaryColumns(query.group_by), body.data, { test: "summary-table", row: () => ({ test: "summary-row" }), empty: "No usage in this period." }),
      pager);
  };
  await show();
  return holder;
}

// --- statements (operator and customer) -------------------------------------------------------

const STATEMENT_ROWS_SHOWN_MAX = 500;

function csvFilename(prefix, range) {
  return `${prefix}-${range.start.slice(0, 10)}-to-${range.end.slice(0, 10)}.csv`;
}

/** "Download CSV": fetched with the Authorization header, saved through a Blob. */
function csvButton(path, currentRange, prefix) {
  const control = button("Download CSV", { class: "button button-small", id: "statement-csv", test: "statement-csv" });
  const note = h("span", { class: "muted small", id: "statement-csv-note", test: "statement-csv-note" });
  control.addEventListener("click", () => busy(control, async () => {
    const range = currentRange();
    const filename = csvFilename(prefix, range);
    const text = await api.download(path, { start: range.start, end: range.end, format: "csv" }, filename);
    const lines = text.split("\n").filter((line) => line !== "");
    note.textContent = `Saved ${filename} (${lines.length - 1} rows).`;
    note.dataset.filename = filename;
    note.dataset.header = lines[0] || "";
  }));
  return [note, control];
}

function statementReference(row) {
  return mono(row.reference_id ?? row.request_id ?? null);
}

function statementTokens(row) {
  return row.kind === "usage" ? `${count(row.input_tokens)} / ${count(row.output_tokens)}` : "";
}

async function statementView(path, range) {
  const body = await api.get(path, { start: range.start, end: range.end, format: "json" });
  const rows = body.rows || [];
  const shown = rows.slice(-STATEMENT_ROWS_SHOWN_MAX);
  const columns = [
    { label: "#", field: "ledger_seq", numeric: true, cell: (row) => mono(row.ledger_seq) },
    { label: "Time (UTC)", field: "created_at", cell: (row) => time(row.created_at) },
    { label: "Kind", field: "kind", cell: (row) => badge(row.kind, `kind-${row.kind}`) },
    { label: "Amount", field: "amount", numeric: true, cell: (row) => money(row.amount) },
    { label: "Balance before", field: "balance_before", numeric: true, cell: (row) => money(row.balance_before) },
    { label: "Balance after", field: "balance_after", numeric: true, cell: (row) => money(row.balance_after) },
    { label: "Reference / request", field: "reference", cell: statementReference },
    { label: "Model / reason", field: "model", cell: (row) => (row.model ? mono(row.model) : row.reason || "") },
    { label: "Tokens in / out", field: "tokens", numeric: true, cell: statementTokens },
  ];
  const statementTable = table(columns, shown, {
    test: "statement-table",
    row: (row) => ({ test: "statement-row", dataset: { kind: row.kind, ref: row.reference_id ?? row.request_id ?? "", seq: String(row.ledger_seq ?? "") } }),
    empty: "No rows in this period.",
  });
  const tableElement = statementTable.querySelector("table");
  tableElement.dataset.start = range.start;
  tableElement.dataset.end = range.end;
  return [
    h("div", { class: "statement-totals" },
      h("span", {}, "Opening balance ", money(body.opening_balance, "opening-balance")),
      h("span", {}, "Closing balance ", money(body.closing_balance, "closing-balance")),
      h("span", { class: "muted" }, `${rows.length} rows, ${range.start.slice(0, 10)} to ${range.end.slice(0, 10)} (end exclusive)`)),
    rows.length > shown.length ? h("p", { class: "muted small" }, `Showing the last ${shown.length} of ${rows.length} rows; the CSV has them all.`) : null,
    statementTable,
  ];
}

// --- keys (operator and customer) ------------------------------------------------------------

function budget(value) {
  return value === null || value === undefined ? h("span", { class: "muted" }, "no limit") : money(value);
}

async function keysTable(path, operator, reload) {
  const body = await api.get(path);
  const columns = [
    { label: "Name / ID", field: "name", cell: (key) => [h("div", {}, key.name), h("div", { class: "mono muted small" }, key.id)] },
    { label: "Prefix", field: "prefix", cell: (key) => mono(`${key.prefix}…`) },
    { label: "Status", field: "status", cell: (key) => statusBadge(key.status) },
    { label: "Daily budget", field: "budget_daily", numeric: true, cell: (key) => budget(key.budget_daily) },
    { label: "Monthly budget", field: "budget_monthly", numeric: true, cell: (key) => budget(key.budget_monthly) },
    { label: "Total budget", field: "budget_total", numeric: true, cell: (key) => budget(key.budget_total) },
    { label: "RPM / TPM", field: "limits", numeric: true, cell: (key) => `${key.rpm ?? "—"} / ${key.tpm ?? "—"}` },
    { label: "Models", field: "allowed_models", cell: (key) => (key.allowed_models ? key.allowed_models.join(", ") : h("span", { class: "muted" }, "all")) },
    { label: "Created", field: "created_at", cell: (key) => [date(key.created_at), key.expires_at ? h("div", { class: "muted small" }, "expires ", date(key.expires_at)) : null] },
  ];
  if (operator) {
    columns.push({ label: "", field: "actions", cell: (key) => revokeControl(key, reload) });
  } else {
    columns.push({ label: "Revoked", field: "revoked_at", cell: (key) => date(key.revoked_at) });
  }
  return table(columns, body.data, { test: "keys-table", row: (key) => ({ test: "key-row", dataset: { id: key.id, status: key.status } }), empty: "No keys yet." });
}

function revokeControl(key, reload) {
  if (key.status !== "active") {
    return key.revoked_at ? h("span", { class: "muted small" }, "revoked ", date(key.revoked_at)) : "";
  }
  const cell = h("span", { class: "row-actions" });
  const revoke = button("Revoke", { class: "button button-danger button-small", test: "revoke-key" });
  revoke.addEventListener("click", () => confirmInline(cell, `Revoke ${key.name}? Requests with it are refused at once.`, "Revoke", async () => {
    await api.remove(`/internal/keys/${encodeURIComponent(key.id)}`);
    showNotice(`Key ${key.name} (${key.prefix}…) revoked.`);
    reload();
  }));
  cell.append(revoke);
  return cell;
}

function createKeyToggle() {
  const toggle = button("Create key", { class: "button button-primary button-small", id: "create-key-toggle", "aria-expanded": "false" });
  toggle.addEventListener("click", () => {
    const form = document.getElementById("create-key-form");
    form.hidden = !form.hidden;
    toggle.setAttribute("aria-expanded", String(!form.hidden));
    if (!form.hidden) {
      document.getElementById("create-key-name").focus();
    }
  });
  return toggle;
}

/** The key's body from the form: empty fields left out, so the API applies no limit. */
function keyRequest(form) {
  const value = (id) => form.querySelector(`#${id}`).value.trim();
  const body = { name: value("create-key-name") };
  for (const [id, name] of [["create-key-budget-daily", "budget_daily"], ["create-key-budget-monthly", "budget_monthly"], ["create-key-budget-total", "budget_total"]]) {
    if (value(id)) {
      body[name] = value(id); // money goes as the typed decimal string
    }
  }
  for (const [id, name] of [["create-key-rpm", "rpm"], ["create-key-tpm", "tpm"]]) {
    if (value(id)) {
      // A whole number goes as a number; anything else as typed, for the API to explain.
      body[name] = /^\d+$/.test(value(id)) ? Number(value(id)) : value(id);
    }
  }
  if (value("create-key-models")) {
    body.allowed_models = value("create-key-models").split(",").map((model) => model.trim()).filter(Boolean);
  }
  return body;
}

function createKeyForm(accountId, reload) {
  const shown = h("div", { id: "new-key-box-holder" });
  const submit = h("button", { type: "submit", class: "button button-primary", id: "create-key-submit" }, "Create key");
  const form = h("form", { class: "inline-form", id: "create-key-form", hidden: true },
    h("div", { class: "form-grid" },
      field("Name", input("create-key-name", { required: true, placeholder: "e.g. production" })),
      field("Daily budget", input("create-key-budget-daily", { inputmode: "decimal", placeholder: "no limit" })),
      field("Monthly budget", input("create-key-budget-monthly", { inputmode: "decimal", placeholder: "no limit" })),
      field("Total budget", input("create-key-budget-total", { inputmode: "decimal", placeholder: "no limit" })),
      field("Requests per minute", input("create-key-rpm", { inputmode: "numeric", placeholder: "no limit" })),
      field("Tokens per minute", input("create-key-tpm", { inputmode: "numeric", placeholder: "no limit" })),
      field("Allowed models", input("create-key-models", { placeholder: "all; or a, b, c" }))),
    h("div", { class: "form-actions" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const created = await busy(submit, () => api.post(`/internal/accounts/${encodeURIComponent(accountId)}/keys`, keyRequest(form)));
    if (created) {
      form.reset();
      form.hidden = true;
      replaceChildren(shown, newKeyBox(created));
      reload();
    }
  });
  return [form, shown];
}

/** The new key, shown this once: Tollgate keeps only its hash. */
function newKeyBox(created) {
  const secret = h("code", { class: "secret", id: "new-key", test: "new-key" }, created.key);
  const copy = button("Copy", { class: "button button-small", id: "new-key-copy" });
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(created.key);
      copy.textContent = "Copied";
    } catch {
      // No clipboard (permissions): select the text so that Ctrl+C copies it.
      getSelection().selectAllChildren(secret);
      copy.textContent = "Selected: press Ctrl+C";
    }
  });
  const box = h("div", { class: "secret-box", id: "new-key-box", test: "new-key-box", role: "status" },
    h("strong", {}, `New key “${created.name}” (${created.prefix}…)`),
    h("p", {}, "Copy it now: this is the only time it is shown. Tollgate stores only its hash and cannot show it again."),
    h("div", { class: "secret-line" }, secret, copy),
    button("I have saved it", { class: "button button-quiet button-small", id: "new-key-dismiss", onclick: () => box.remove() }));
  return box;
}

// --- funds: top-up (two steps), refund, adjustment --------------------------------------------

function fundsCard(accountId, afterChange) {
  const panels = {
    topup: topUpPanel(accountId, afterChange),
    refund: refundPanel(accountId, afterChange),
    adjustment: adjustmentPanel(accountId, afterChange),
  };
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const select = (chosen) => {
    for (const [name, panel] of Object.entries(panels)) {
      panel.hidden = name !== chosen;
    }
    for (const tab of tabs.children) {
      tab.setAttribute("aria-selected", String(tab.dataset.panel === chosen));
    }
  };
  for (const [name, label] of [["topup", "Top up"], ["refund", "Refund"], ["adjustment", "Adjustment"]]) {
    tabs.append(h("button", { type: "button", class: "tab", role: "tab", id: `funds-tab-${name}`, dataset: { panel: name }, onclick: () => select(name) }, label));
  }
  select("topup");
  return card("Funds", { test: "funds-card" }, tabs, Object.values(panels));
}

function topUpPanel(accountId, afterChange) {
  const amount = input("topup-amount", { inputmode: "decimal", placeholder: "e.g. 25.00", required: true });
  const reference = input("topup-reference", { value: freshReference("topup"), required: true });
  const create = h("button", { type: "submit", class: "button button-primary", id: "topup-create" }, "1. Create top-up");
  const step = h("div", { id: "topup-step", test: "topup-step" });
  const form = h("form", { class: "funds-form", id: "topup-form" },
    h("p", { class: "muted small" }, "A top-up is created pending, then confirmed: only a confirmed top-up adds to the balance. The reference id applies once."),
    field("Amount", amount),
    field("Reference id", reference, "Prefilled with a fresh one; a payment id also works."),
    h("div", { class: "form-actions" }, create),
    step);
  // Top-ups created earlier and never confirmed (a payment that arrived later, a closed tab).
  const waiting = h("div", { id: "topups-pending", test: "topups-pending" });
  api.get("/internal/topups", { account_id: accountId, status: "pending", limit: 20 }).then((body) => {
    const rows = body.data || [];
    if (rows.length) {
      replaceChildren(waiting, h("h4", {}, `Pending top-ups (${rows.length})`), rows.map((topUp) => pendingTopUp(topUp, afterChange, `topup-confirm-${topUp.id}`)));
    }
  }, showError);
  form.append(waiting);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const pending = await busy(create, () => api.post("/internal/topups", { account_id: accountId, amount: amount.value.trim(), reference_id: reference.value.trim() }));
    if (pending) {
      replaceChildren(step, pendingTopUp(pending, () => {
        amount.value = "";
        reference.value = freshReference("topup");
        afterChange();
      }));
    }
  });
  return h("div", { class: "tab-panel", role: "tabpanel" }, form);
}

function pendingTopUp(topUp, afterConfirm, confirmId = "topup-confirm") {
  const confirm = button("2. Confirm top-up", { class: "button button-primary", id: confirmId });
  const box = h("div", { class: "step-box", test: "topup-pending", dataset: { id: topUp.id } },
    h("div", {}, h("strong", {}, "Top-up created: "), statusBadge(topUp.status)),
    h("dl", { class: "facts" },
      h("dt", {}, "ID"), h("dd", {}, mono(topUp.id)),
      h("dt", {}, "Amount"), h("dd", {}, money(topUp.amount, "topup-pending-amount")),
      h("dt", {}, "Reference"), h("dd", {}, mono(topUp.reference_id))),
    topUp.status === "pending" ? confirm : h("p", { class: "muted small" }, "This reference was already confirmed: nothing more to do."));
  confirm.addEventListener("click", async () => {
    const result = await busy(confirm, () => api.post(`/internal/topups/${encodeURIComponent(topUp.id)}/confirm`));
    if (result) {
      const transaction = result.transaction || {};
      replaceChildren(box, h("div", { test: "topup-confirmed" },
        h("strong", {}, "Top-up confirmed: "), statusBadge(result.topup?.status || "confirmed"),
        h("p", {}, "Deposited ", money(transaction.amount ?? topUp.amount), "; balance ", money(transaction.balance_before), " → ", money(transaction.balance_after, "topup-balance-after"), ".")));
      afterConfirm();
    }
  });
  return box;
}

function fundResult(kind, transaction) {
  showNotice(`${kind} applied: `, money(transaction.amount), "; balance ", money(transaction.balance_before), " → ", money(transaction.balance_after), ` (reference ${transaction.reference_id}).`);
}

function refundPanel(accountId, afterChange) {
  const amount = input("refund-amount", { inputmode: "decimal", placeholder: "e.g. 5.00", required: true });
  const reason = input("refund-reason", { required: true, placeholder: "why" });
  const reference = input("refund-reference", { value: freshReference("refund"), required: true });
  const submit = h("button", { type: "submit", class: "button button-primary", id: "refund-submit" }, "Refund");
  const form = h("form", { class: "funds-form", id: "refund-form" },
    h("p", { class: "muted small" }, "Takes money out of the account (returned to the customer). Refused beyond the free funds."),
    field("Amount", amount), field("Reason", reason), field("Reference id", reference),
    h("div", { class: "form-actions" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { amount: amount.value.trim(), reason: reason.value.trim(), reference_id: reference.value.trim() };
    const transaction = await busy(submit, () => api.post(`/internal/accounts/${encodeURIComponent(accountId)}/refunds`, body));
    if (transaction) {
      fundResult("Refund", transaction);
      form.reset();
      reference.value = freshReference("refund");
      afterChange();
    }
  });
  return h("div", { class: "tab-panel", role: "tabpanel" }, form);
}

function adjustmentPanel(accountId, afterChange) {
  const amount = input("adjustment-amount", { inputmode: "decimal", placeholder: "signed, e.g. -1.50 or 2", required: true });
  const reason = input("adjustment-reason", { required: true, placeholder: "why" });
  const operator = input("adjustment-operator", { required: true, placeholder: "who (your name or id)" });
  const reference = input("adjustment-reference", { value: freshReference("adjustment"), required: true });
  const submit = h("button", { type: "submit", class: "button button-primary", id: "adjustment-submit" }, "Adjust");
  const form = h("form", { class: "funds-form", id: "adjustment-form" },
    h("p", { class: "muted small" }, "A signed correction recorded with who made it and why."),
    field("Amount", amount), field("Reason", reason), field("Operator", operator), field("Reference id", reference),
    h("div", { class: "form-actions" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { amount: amount.value.trim(), reason: reason.value.trim(), operator_id: operator.value.trim(), reference_id: reference.value.trim() };
    const transaction = await busy(submit, () => api.post(`/internal/accounts/${encodeURIComponent(accountId)}/adjustments`, body));
    if (transaction) {
      fundResult("Adjustment", transaction);
      amount.value = "";
      reason.value = "";
      reference.value = freshReference("adjustment");
      afterChange();
    }
  });
  return h("div", { class: "tab-panel", role: "tabpanel" }, form);
}

// --- operator: prices -------------------------------------------------------------------------

/** A cache price; unset, the input price applies. */
const cachePrice = (value) => (value === null || value === undefined ? h("span", { class: "muted small" }, "as input") : money(value));

const PRICE_COLUMNS = [
  { label: "Input / Mtok", field: "input_per_mtok", numeric: true, cell: (price) => money(price.input_per_mtok) },
  { label: "Output / Mtok", field: "output_per_mtok", numeric: true, cell: (price) => money(price.output_per_mtok) },
  { label: "Cached input / Mtok", field: "cached_input_per_mtok", numeric: true, cell: (price) => cachePrice(price.cached_input_per_mtok) },
  { label: "Cache write / Mtok", field: "cache_write_per_mtok", numeric: true, cell: (price) => cachePrice(price.cache_write_per_mtok) },
  { label: "Per request", field: "per_request", numeric: true, cell: (price) => money(price.per_request) },
  { label: "Effective from", field: "effective_from", cell: (price) => time(price.effective_from) },
];

function renderPrices(page) {
  document.title = "Prices · Tollgate console";
  const current = h("div", { test: "prices-current" });
  const history = h("div", { id: "price-history", test: "price-history" });
  const tierFilter = h("select", { id: "prices-tier", "aria-label": "Tier" }, h("option", { value: "" }, "All tiers"));
  let prices = [];

  const showHistory = (price) => {
    history.hidden = false;
    loadInto(history, async () => {
      const body = await api.get("/internal/prices/history", { provider: price.provider, model: price.model, customer_type: price.customer_type, limit: 100 });
      return card(`History: ${price.provider} / ${price.model} / tier ${price.customer_type}`, {},
        h("p", { class: "muted small" }, "Newest first, superseded rows included; usage rows name the price row they were charged at (price_id)."),
        table([
          { label: "ID", field: "id", numeric: true, cell: (row) => mono(row.id) },
          { label: "", field: "current", cell: (row) => (row.id === price.id ? badge("current", "good") : badge("superseded", "neutral")) },
          ...PRICE_COLUMNS,
        ], body.data, { test: "price-history-table", row: (row) => ({ test: "price-history-row", dataset: { id: String(row.id) } }) }));
    });
    history.scrollIntoView({ block: "nearest" });
  };

  const show = () => {
    const tier = tierFilter.value;
    const rows = prices.filter((price) => !tier || price.customer_type === tier)
      .sort((a, b) => a.customer_type.localeCompare(b.customer_type) || a.provider.localeCompare(b.provider) || a.model.localeCompare(b.model));
    replaceChildren(current, table([
      { label: "Tier", field: "customer_type", cell: (price) => price.customer_type },
      { label: "Provider", field: "provider", cell: (price) => mono(price.provider) },
      { label: "Model", field: "model", cell: (price) => mono(price.model) },
      ...PRICE_COLUMNS,
      { label: "", field: "actions", cell: (price) => button("History", { class: "button button-small", test: "price-history-button", onclick: () => showHistory(price) }) },
    ], rows, { test: "prices-table", row: (price) => ({ test: "price-row", dataset: { model: price.model, tier: price.customer_type } }), empty: "No prices: every request would be refused (price_not_configured)." }));
  };
  tierFilter.addEventListener("change", show);

  append(page,
    h("header", { class: "page-header" }, h("h1", {}, "Prices")),
    h("p", { class: "muted" }, "Current prices per tier, in the account's currency per million tokens. Change them with PUT /internal/prices or tollgate prices import."),
    card("Current prices", { actions: tierFilter }, current),
    history);
  history.hidden = true;
  loadInto(current, async () => {
    prices = (await api.get("/internal/prices")).data;
    for (const tier of [...new Set(prices.map((price) => price.customer_type))].sort()) {
      tierFilter.append(h("option", { value: tier }, tier));
    }
    show();
    return [...current.childNodes];
  });
}

// --- operator: operations ---------------------------------------------------------------------

function renderOperations(page) {
  document.title = "Operations · Tollgate console";
  const runs = h("div", { test: "reconciliations" });
  const jobs = h("div", { test: "jobs" });
  const alerts = h("div", { test: "alerts" });
  const channels = h("div", { test: "channels" });

  const loadRuns = () => loadInto(runs, reconciliationTable);
  const fix = h("input", { type: "checkbox", id: "reconcile-fix" });
  const run = button("Run reconciliation", { class: "button button-primary button-small", id: "reconcile-run" });
  run.addEventListener("click", () => busy(run, async () => {
    const report = await api.post("/internal/reconcile", { fix: fix.checked });
    showNotice(`Reconciliation run ${report.id}: ${report.accounts_checked} accounts checked, ${report.drifts_found} drifts (total `, money(report.total_drift), `), ${report.accounts_repaired} repaired, ${report.accounts_busy} busy.`);
    loadRuns();
  }));

  const jobFilter = h("select", { id: "jobs-filter", "aria-label": "Job" }, h("option", { value: "" }, "All jobs"),
    ["reconcile", "hold_sweep", "stream_lag", "webhooks", "prune", "partitions"].map((job) => h("option", { value: job }, job)));
  const loadJobs = () => loadInto(jobs, () => jobsTable(jobFilter.value));
  jobFilter.addEventListener("change", loadJobs);

  append(page,
    h("header", { class: "page-header" }, h("h1", {}, "Operations")),
    card("Reconciliation", { test: "reconciliation-card", actions: [h("label", { class: "choice small" }, fix, "repair drift (fix)"), run] },
      h("p", { class: "muted small" }, "Compares every account's ledger rows, account_balance and hot-store balance. Without fix it only reports."),
      runs),
    card("Periodic jobs", { test: "jobs-card", actions: jobFilter }, jobs),
    card("Alerts", { test: "alerts-card" }, alerts),
    card("Channels", { test: "channels-card" }, channels));
  loadRuns();
  loadJobs();
  loadInto(alerts, alertsTable);
  loadInto(channels, channelsTable);
}

async function reconciliationTable() {
  const body = await api.get("/internal/reconciliations");
  const columns = [
    { label: "Run", field: "id", numeric: true, cell: (run) => mono(run.id) },
    { label: "Started", field: "started_at", cell: (run) => time(run.started_at) },
    { label: "Finished", field: "finished_at", cell: (run) => (run.finished_at ? time(run.finished_at) : badge("unfinished", "warn")) },
    { label: "Duration", field: "duration", numeric: true, cell: (run) => (run.report?.duration_ms !== undefined ? `${run.report.duration_ms} ms` : "") },
    { label: "Fix", field: "fix", cell: (run) => (run.fix ? "yes" : "no") },
    { label: "Checked", field: "accounts_checked", numeric: true, cell: (run) => count(run.accounts_checked) },
    { label: "Busy", field: "accounts_busy", numeric: true, cell: (run) => count(run.accounts_busy) },
    { label: "Drifts", field: "drifts_found", numeric: true, cell: (run) => (run.drifts_found > 0 ? badge(String(run.drifts_found), "bad") : "0") },
    { label: "Repaired", field: "accounts_repaired", numeric: true, cell: (run) => count(run.accounts_repaired) },
    { label: "Total drift", field: "total_drift", numeric: true, cell: (run) => money(run.total_drift) },
  ];
  const wrap = table(columns, body.data.slice(0, 50), { test: "reconciliations-table", row: (run) => ({ test: "reconciliation-row", dataset: { id: String(run.id) } }), empty: "No run yet." });
  // Each listed drift under its run: which balance, found, expected, by how much.
  const rows = wrap.querySelectorAll("tbody tr[data-test=reconciliation-row]");
  body.data.slice(0, 50).forEach((run, index) => {
    const drifts = run.report?.drifts || [];
    if (drifts.length === 0) {
      return;
    }
    const detail = table([
      { label: "Account", cell: (drift) => accountLink(drift.account_id) },
      { label: "Balance", cell: (drift) => drift.kind },
      { label: "Found", numeric: true, cell: (drift) => money(drift.found) },
      { label: "Expected", numeric: true, cell: (drift) => money(drift.expected) },
      { label: "Drift", numeric: true, cell: (drift) => money(drift.amount) },
      { label: "Repaired", cell: (drift) => (drift.repaired ? "yes" : drift.unrepaired_because || "no") },
    ], drifts, { test: "drifts-table" });
    rows[index].after(h("tr", { class: "detail-row" }, h("td", { colspan: columns.length }, detail,
      run.report.drifts_not_listed ? h("p", { class: "muted small" }, `${run.report.drifts_not_listed} more drifts not listed.`) : null)));
  });
  return wrap;
}

async function jobsTable(job) {
  const body = await api.get("/internal/jobs", { job });
  return table([
    { label: "Job", field: "job", cell: (run) => mono(run.job) },
    { label: "Period start", field: "period_start", cell: (run) => time(run.period_start) },
    { label: "Started", field: "started_at", cell: (run) => time(run.started_at) },
    { label: "Finished", field: "finished_at", cell: (run) => (run.finished_at ? time(run.finished_at) : badge("running", "warn")) },
    { label: "Holder", field: "holder", cell: (run) => mono(run.holder) },
    { label: "Fence", field: "fence", numeric: true, cell: (run) => mono(run.fence) },
    { label: "Outcome", field: "outcome", cell: (run) => h("span", { class: "outcome" }, run.outcome ?? "") },
  ], body.data.slice(0, 25), { test: "jobs-table", empty: "No job has run yet." });
}

/** An event's payload as "name value" pairs (its account is in its own column). */
function payload(data) {
  const entries = Object.entries(data || {}).filter(([name]) => name !== "account_id");
  return h("span", { class: "payload" }, entries.map(([name, value]) => h("span", { class: "payload-entry" },
    h("span", { class: "muted" }, `${name} `), typeof value === "object" && value !== null ? JSON.stringify(value) : String(value))));
}

async function alertsTable() {
  const body = await api.get("/internal/alerts");
  const columns = [
    { label: "ID", field: "id", numeric: true, cell: (alert) => mono(alert.id) },
    { label: "Event", field: "event_type", cell: (alert) => mono(alert.event_type) },
    { label: "Account", field: "account_id", cell: (alert) => (alert.account_id ? accountLink(alert.account_id) : dash()) },
    { label: "Payload", field: "payload", cell: (alert) => payload(alert.payload) },
    { label: "Created", field: "created_at", cell: (alert) => time(alert.created_at) },
    { label: "Delivery", field: "status", cell: (alert) => [
      h("div", {}, statusBadge(alert.status), " ", h("span", { class: "muted small" }, `${count(alert.attempts)} attempt${alert.attempts === 1 ? "" : "s"}`)),
      alert.delivered_at ? h("div", { class: "small" }, "delivered ", time(alert.delivered_at)) : null,
      alert.last_error ? h("div", { class: "small load-error" }, alert.last_error) : null] },
    { label: "", field: "actions", cell: (alert) => button("Deliveries", { class: "button button-small", test: "deliveries-button", dataset: { id: String(alert.id) } }) },
  ];
  const wrap = table(columns, body.data.slice(0, 100), { test: "alerts-table", row: (alert) => ({ test: "alert-row", dataset: { id: String(alert.id) } }), empty: "No alerts." });
  for (const control of wrap.querySelectorAll("button[data-test=deliveries-button]")) {
    control.addEventListener("click", () => toggleDeliveries(control, columns.length));
  }
  return wrap;
}

/** Opens (or closes) the row of an alert's delivery attempts under it. */
function toggleDeliveries(control, width) {
  const row = control.closest("tr");
  if (row.nextElementSibling?.classList.contains("detail-row")) {
    row.nextElementSibling.remove();
    return;
  }
  const holder = h("div", { test: "deliveries" });
  row.after(h("tr", { class: "detail-row" }, h("td", { colspan: width }, holder)));
  loadInto(holder, async () => {
    const body = await api.get(`/internal/alerts/${encodeURIComponent(control.dataset.id)}/deliveries`);
    return table([
      { label: "Attempt", numeric: true, cell: (attempt) => count(attempt.attempt) },
      { label: "At", cell: (attempt) => time(attempt.attempted_at) },
      { label: "URL", cell: (attempt) => mono(attempt.url) },
      { label: "HTTP status", numeric: true, cell: (attempt) => (attempt.status_code ?? dash()) },
      { label: "Error", cell: (attempt) => attempt.error ?? "" },
      { label: "Duration", numeric: true, cell: (attempt) => `${attempt.duration_ms} ms` },
    ], body.data, { test: "deliveries-table", empty: "No delivery attempt yet (no webhook URL configured, or not due)." });
  });
}

async function channelsTable() {
  const body = await api.get("/internal/channels");
  const rows = body.data || body.channels || [];
  return table([
    { label: "Model", field: "model", cell: (channel) => mono(channel.model) },
    { label: "Channel", field: "channel", cell: (channel) => mono(channel.channel) },
    { label: "Provider", field: "provider", cell: (channel) => mono(channel.provider) },
    { label: "Upstream model", field: "upstream_model", cell: (channel) => mono(channel.upstream_model) },
    { label: "Priority", field: "priority", numeric: true, cell: (channel) => count(channel.priority) },
    { label: "Weight", field: "weight", numeric: true, cell: (channel) => count(channel.weight) },
    { label: "Enabled", field: "enabled", cell: (channel) => (channel.enabled ? badge("enabled", "good") : badge("disabled", "bad")) },
    { label: "Breaker", field: "breaker", cell: (channel) => badge(channel.breaker, channel.breaker === "closed" ? "good" : "warn") },
    { label: "In flight", field: "in_flight", numeric: true, cell: (channel) => `${count(channel.in_flight)}${channel.concurrent_requests_max ? ` of ${count(channel.concurrent_requests_max)}` : ""}` },
    { label: "Open until", field: "open_until", cell: (channel) => time(channel.open_until) },
    { label: "Added", field: "added", cell: (channel) => (channel.added ? "at run time" : "configured") },
  ], rows, { test: "channels-table", empty: "No channels." });
}

// --- customer area ----------------------------------------------------------------------------

function remaining(value) {
  return value === null || value === undefined ? h("span", { class: "muted" }, "no limit") : money(value);
}

function customerStats(balance) {
  const currency = balance.currency ? ` (${balance.currency})` : "";
  return [
    stat(`Balance${currency}`, money(balance.balance), "me-balance"),
    stat("Held", money(balance.held), "me-held", "reserved by requests in flight"),
    stat("Available", money(balance.available), "me-available", balance.credit_limit && balance.credit_limit !== "0" ? ["credit limit ", money(balance.credit_limit)] : null),
    stat("Requests today", count(balance.daily_requests_used), "me-daily-requests", quotaNote(balance.daily_request_quota)),
    stat("Requests this month", count(balance.monthly_requests_used), "me-monthly-requests", quotaNote(balance.monthly_request_quota)),
  ];
}

function keyBudgets(key) {
  const budgets = key || {};
  return [
    h("p", { class: "muted small key-line" }, "The key you logged in with: ", h("span", { class: "mono", id: "me-key-id" }, budgets.id ?? "")),
    h("div", { class: "stats stats-compact" },
      stat("Today's budget left", remaining(budgets.budget_daily_remaining), "me-budget-daily"),
      stat("This month's budget left", remaining(budgets.budget_monthly_remaining), "me-budget-monthly"),
      stat("Total budget left", remaining(budgets.budget_total_remaining), "me-budget-total"))];
}

function renderCustomerOverview(page) {
  document.title = "Overview · Tollgate console";
  const stats = h("div", { class: "stats", test: "me-stats" });
  const budgets = h("div", { test: "me-budgets" });
  const usage = h("div", { test: "me-usage-chart" });
  let range = periodRange(periodDays);
  const loadUsage = () => loadInto(usage, () => usageChart("/v1/usage/summary", {}, range, usage));
  append(page,
    h("header", { class: "page-header" }, h("h1", { id: "me-title" }, "Your account")),
    stats,
    card("This key's budgets", {}, budgets),
    card("Usage by day and model", { test: "usage-card", actions: periodSelect((next) => { range = next; loadUsage(); }) }, usage));
  loadInto(stats, async () => {
    const balance = await api.get("/v1/balance");
    document.getElementById("me-title").textContent = `Account ${balance.account_id}`;
    replaceChildren(budgets, keyBudgets(balance.key));
    return customerStats(balance);
  });
  loadUsage();
}

const GROUPINGS = [["day,model", "day and model"], ["day,key", "day and key"], ["model", "model"], ["key", "key"], ["day", "day"]];

function renderCustomerUsage(page) {
  document.title = "Usage · Tollgate console";
  const summary = h("div", { test: "me-summary" });
  const recent = h("div", { test: "me-recent" });
  let range = periodRange(periodDays);
  const groupBy = h("select", { id: "usage-group-by", test: "usage-group-by", "aria-label": "Group by" },
    GROUPINGS.map(([value, label]) => h("option", { value }, `by ${label}`)));
  const loadSummary = () => loadInto(summary, () => summaryTable("/v1/usage/summary", { group_by: groupBy.value }, range, "me-summary-table"));
  groupBy.addEventListener("change", loadSummary);
  append(page,
    h("header", { class: "page-header" }, h("h1", {}, "Usage")),
    card("Usage summary", { test: "summary-card", actions: [groupBy, periodSelect((next) => { range = next; loadSummary(); loadRecent(); })] }, summary),
    card("Requests", { test: "recent-card" }, recent));
  const loadRecent = () => loadInto(recent, () => usageRows(range));
  loadSummary();
  loadRecent();
}

/** The caller's usage rows, newest first, a page at a time. */
async function usageRows(range) {
  const holder = h("div");
  const cursors = [null];
  const columns = [
    { label: "Time (UTC)", field: "created_at", cell: (row) => time(row.created_at) },
    { label: "Request", field: "request_id", cell: (row) => mono(row.request_id) },
    { label: "Model", field: "model", cell: (row) => mono(row.model) },
    { label: "Key", field: "api_key_id", cell: (row) => shortId(row.api_key_id) },
    { label: "Status", field: "status", cell: (row) => statusBadge(row.status) },
    { label: "Input tokens", field: "input_tokens", numeric: true, cell: (row) => [count(row.usage?.input_tokens), row.usage?.cached_input_tokens ? h("div", { class: "muted small" }, `+${count(row.usage.cached_input_tokens)} cached`) : null] },
    { label: "Output tokens", field: "output_tokens", numeric: true, cell: (row) => count(row.usage?.output_tokens) },
    { label: "Cost", field: "cost", numeric: true, cell: (row) => money(row.cost) },
    { label: "Balance after", field: "balance_after", numeric: true, cell: (row) => money(row.balance_after) },
  ];
  const show = async () => {
    const body = await api.get("/v1/usage", { start: range.start, end: range.end, limit: 25, cursor: cursors[cursors.length - 1] });
    const previous = button("← Newer", { class: "button button-small", disabled: cursors.length === 1 });
    previous.addEventListener("click", () => busy(previous, () => { cursors.pop(); return show(); }));
    const next = button("Older →", { class: "button button-small", disabled: body.next_cursor === null || body.next_cursor === undefined });
    next.addEventListener("click", () => busy(next, () => { cursors.push(body.next_cursor); return show(); }));
    replaceChildren(holder,
      table(columns, body.data, { test: "usage-rows-table", row: (row) => ({ test: "usage-row", dataset: { request: row.request_id } }), empty: "No requests in this period." }),
      h("div", { class: "pager" }, previous, h("span", { class: "muted" }, `Page ${cursors.length}`), next));
  };
  await show();
  return holder;
}

function renderCustomerStatement(page) {
  document.title = "Statement · Tollgate console";
  const statement = h("div", { test: "me-statement" });
  let range = periodRange(periodDays);
  const load = () => loadInto(statement, () => statementView("/v1/statement", range));
  append(page,
    h("header", { class: "page-header" }, h("h1", {}, "Statement")),
    h("div", { class: "toolbar" }, h("span", { class: "muted" }, "Period (UTC):"), periodSelect((next) => { range = next; load(); })),
    card("Deposits, refunds, adjustments and usage, in ledger order", { test: "statement-card", actions: csvButton("/v1/statement", () => range, "statement") }, statement));
  load();
}

function renderCustomerKeys(page) {
  document.title = "Keys · Tollgate console";
  const keys = h("div", { test: "me-keys" });
  append(page,
    h("header", { class: "page-header" }, h("h1", {}, "Keys")),
    h("p", { class: "muted" }, "Your account's keys and their limits. A key's secret is shown only once, when an operator creates it."),
    card("Keys", { test: "keys-card" }, keys));
  loadInto(keys, () => keysTable("/v1/keys", false));
}

start();
