// A validation report (a training job's, a version's, a comparison's side) as DOM: accuracy, counts,
// per-class precision/recall/F1, the confusion matrix (rows: true class, columns: predicted) and beside it the
// reliability diagram (reliability.js).
import { el, percent } from "./api.js";
import { renderReliability } from "./reliability.js";

// A card's `metrics` (today's heads) in the report shape of the API contract.
export function fromMetrics(metrics) {
  if (!metrics || typeof metrics !== "object") return null;
  const perClass = {};
  for (const [label, m] of Object.entries(metrics.per_class || {})) {
    perClass[label] = { precision: m.precision, recall: m.recall, f1: m.f1 ?? m["f1-score"], support: m.support };
  }
  return { accuracy: metrics.accuracy, classes: metrics.classes || Object.keys(perClass), confusion_matrix: metrics.confusion_matrix,
           per_class: perClass, n_train: null, n_val: metrics.n ?? null };
}

function num(x, digits = 3) {
  return typeof x === "number" ? x.toFixed(digits) : "–";
}

export function renderReport(report, title = "Validation report") {
  const box = el("div", { class: "report" });
  if (!report) return box;
  box.append(el("h4", {}, title));
  const counts = [];
  if (typeof report.n_train === "number") counts.push(`${report.n_train} training photos`);
  if (typeof report.n_val === "number") counts.push(`${report.n_val} validation photos`);
  box.append(el("p", { class: "accuracy" }, `Accuracy ${percent(report.accuracy)}`, counts.length ? ` (${counts.join(", ")})` : ""));
  const classes = Array.isArray(report.classes) ? report.classes : [];
  const perClass = report.per_class || {};
  if (Object.keys(perClass).length) {
    const table = el("table", { class: "per-class" },
      el("caption", {}, "Per class"),
      el("thead", {}, el("tr", {}, ["class", "precision", "recall", "F1", "photos"].map((h) => el("th", { scope: "col" }, h)))));
    const body = el("tbody");
    for (const label of classes.length ? classes : Object.keys(perClass)) {
      const m = perClass[label] || {};
      body.append(el("tr", {}, el("th", { scope: "row" }, label), el("td", { class: "num" }, num(m.precision)),
        el("td", { class: "num" }, num(m.recall)), el("td", { class: "num" }, num(m.f1 ?? m["f1-score"])),
        el("td", { class: "num" }, typeof m.support === "number" ? String(Math.round(m.support)) : "–")));
    }
    table.append(body);
    box.append(table);
  }
  const cm = report.confusion_matrix;
  if (Array.isArray(cm) && cm.length) {
    const table = el("table", { class: "cm" }, el("caption", {}, "Confusion matrix (rows: true class, columns: predicted)"));
    table.append(el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "true \\ predicted"),
      cm.map((_, j) => el("th", { scope: "col" }, classes[j] ?? String(j))))));
    const body = el("tbody");
    cm.forEach((row, i) => {
      body.append(el("tr", {}, el("th", { scope: "row" }, classes[i] ?? String(i)),
        row.map((n, j) => el("td", { class: i === j ? "num diag" : "num" }, String(n)))));
    });
    table.append(body);
    box.append(el("div", { class: "beside" }, table, renderReliability(report.calibration)));
  }
  return box;
}
