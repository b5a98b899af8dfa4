// Heads: every head with its versions (metrics, reports, confusion matrices); promote a version,
// roll back, compare two versions on the head's fixed validation set.
import { call, el, headsChanged, path, percent, show, showError, showStatus } from "./api.js";
import { fromMetrics, renderReport } from "./report.js";

const $ = (id) => document.getElementById(id);
let compareForms = 0; // ids for the compare selects' labels

function versionRow(name, v, article) {
  const actions = el("td");
  if (!v.current) {
    const promote = el("button", { type: "button", class: "promote" }, `Promote version ${v.version}`);
    promote.addEventListener("click", () => change(article, name, "promote", { version: v.version }));
    actions.append(promote);
  }
  return el("tr", { "data-version": v.version },
    el("td", { class: "num" }, String(v.version)),
    el("td", {}, v.current ? "current" : ""),
    el("td", {}, v.created_at ? v.created_at.replace("T", " ").slice(0, 19) : "–"),
    el("td", { class: "num accuracy" }, percent(v.accuracy ?? (v.report ? v.report.accuracy : undefined))),
    el("td", {}, (v.classes || []).join(", ")),
    actions);
}

async function change(article, name, what, json) {
  const status = article.querySelector(".head-status");
  showStatus(status, what === "promote" ? `Promoting version ${json.version}…` : "Rolling back…");
  let listed;
  try {
    listed = await call("POST", path`v1/heads/${name}/${what}`, { json, admin: true });
  } catch (err) {
    showError(status, err);
    return;
  }
  headsChanged();  // the head list (and the classify head picker) are read again
  await refreshing;
  const fresh = Array.from($("heads-list").children).find((a) => a.dataset.head === name);
  const served = listed.served !== null && listed.served !== undefined ? `, version ${listed.served} served` : "";
  if (fresh) showStatus(fresh.querySelector(".head-status"), `${what === "promote" ? "Promoted" : "Rolled back"}: version ${listed.current} is current${served}`, "ok");
}

async function compare(article, name, a, b) {
  const out = article.querySelector(".compare-out");
  try {
    const result = await call("GET", `${path`v1/heads/${name}/compare`}?${new URLSearchParams({ a, b })}`);
    show(out, el("p", {}, `Both scored on the same ${result.validation_images} validation photos`),
      el("div", { class: "reports" }, renderReport(result.a.report, `Version ${result.a.version}`),
        renderReport(result.b.report, `Version ${result.b.version}`)));
  } catch (err) {
    show(out, el("p", { class: "error", role: "alert" }, err.describe ? err.describe() : String(err)));
  }
}

function compareForm(article, name, versions) {
  const numbers = versions.map((v) => v.version);
  const pick = (id, label, value) => {
    const select = el("select", { id }, numbers.map((n) => el("option", { value: n }, String(n))));
    select.value = String(value);
    return [el("label", { for: id }, label), select];
  };
  compareForms += 1;
  const [la, a] = pick(`compare-a-${compareForms}`, "Compare version", numbers[numbers.length - 2]);
  const [lb, b] = pick(`compare-b-${compareForms}`, "with version", numbers[numbers.length - 1]);
  const button = el("button", { type: "button", class: "compare" }, "Compare");
  button.addEventListener("click", () => compare(article, name, a.value, b.value));
  return el("div", { class: "row" }, la, a, lb, b, button);
}

async function renderHead(article, name) {
  const [listed, model] = await Promise.all([
    call("GET", path`v1/heads/${name}/versions`),
    call("GET", path`v1/models/${name}`).catch(() => null),
  ]);
  const rows = el("tbody", {}, listed.versions.map((v) => versionRow(name, v, article)));
  const table = el("table", { class: "versions" },
    el("caption", {}, `Versions of ${name}`),
    el("thead", {}, el("tr", {}, ["version", "", "created", "accuracy", "classes", ""].map((h) => el("th", { scope: "col" }, h)))),
    rows);
  const reports = el("div", { class: "reports" });
  for (const v of listed.versions) {
    let report = v.report;
    if (!report && model && model.card && v.version === listed.served) report = fromMetrics(model.card.metrics);
    if (report) {
      reports.append(el("details", { class: "version-report", "data-version": v.version, open: v.current },
        el("summary", {}, `Version ${v.version} report${v.current ? " (current)" : ""}`), renderReport(report, `Version ${v.version}`)));
    }
  }
  const rollback = el("button", { type: "button", class: "rollback" }, `Roll back ${name}`);
  rollback.disabled = listed.versions.length < 2;
  rollback.addEventListener("click", () => change(article, name, "rollback", undefined));
  const served = listed.served === null || listed.served === undefined ? "not served" : `serving version ${listed.served}`;
  show(article,
    el("h3", {}, name),
    el("p", { class: "summary" }, `current version ${listed.current}, ${served}`),
    listed.error ? el("p", { class: "error" }, listed.error) : null,
    table,
    el("div", { class: "row" }, rollback),
    listed.versions.length >= 2 ? compareForm(article, name, listed.versions) : null,
    el("div", { class: "compare-out" }),
    reports,
    el("p", { class: "head-status status", role: "status", "aria-live": "polite" }));
}

let refreshing = Promise.resolve();

export function refresh(onModels) {
  refreshing = load(onModels);
  return refreshing;
}

async function load(onModels) {
  const status = $("heads-status");
  const list = $("heads-list");
  showStatus(status, "Loading heads…");
  let models;
  try {
    models = await call("GET", "v1/models");
  } catch (err) {
    list.replaceChildren();
    showError(status, err);
    return;
  }
  onModels(models);
  const articles = models.models.map((m) => el("article", { class: "head", "data-head": m.name }, el("h3", {}, m.name)));
  show(list, articles);
  const results = await Promise.allSettled(models.models.map((m, i) => renderHead(articles[i], m.name)));
  const failed = results.map((r, i) => [r, i]).filter(([r]) => r.status === "rejected");
  for (const [r, i] of failed) articles[i].append(el("p", { class: "error", role: "alert" }, r.reason.describe ? r.reason.describe() : String(r.reason)));
  showStatus(status, `${models.models.length} head${models.models.length === 1 ? "" : "s"}; default: ${models.default}`, failed.length ? "error" : "ok");
}

export function init(onModels) {
  $("heads-refresh").addEventListener("click", () => refresh(onModels));
  document.addEventListener("tlserve:heads-changed", () => refresh(onModels));
}
