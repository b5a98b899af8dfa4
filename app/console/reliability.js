// The reliability diagram of a version's report (its card's out-of-fold calibration, app/core/calibration.py),
// rendered the way the confusion matrix is: a small table beside it. One column a confidence bin: the mean
// confidence of the top answers in it, how often they were right, and how many photos; a calibrated head's
// two rows agree.
import { el } from "./api.js";

const pct = (v) => (typeof v === "number" ? `${Math.round(100 * v)}%` : "–");

export function renderReliability(calibration) {
  const r = calibration && calibration.reliability;
  if (!r || !Array.isArray(r.confidence) || !r.confidence.length) return null;
  const ece = (v) => (typeof v === "number" ? v.toFixed(3) : "–");
  const how = calibration.applied
    ? `temperature ${Number(calibration.temperature).toFixed(2)}, ECE ${ece(calibration.ece_before)} → ${ece(calibration.ece_after)}`
    : `ECE ${ece(calibration.ece_after)} (no temperature: it did not lower the ECE)`;
  const row = (label, values, fmt) =>
    el("tr", {}, el("th", { scope: "row" }, label), values.map((v) => el("td", { class: "num" }, fmt(v))));
  return el("table", { class: "cm reliability" },
    el("caption", {}, `Reliability, out of fold (n=${calibration.n}): ${how}`),
    el("tbody", {}, row("confidence", r.confidence, pct), row("right", r.accuracy, pct),
      row("photos", r.count || [], (v) => String(v))));
}
