// The reliability diagram of a version's report (its card's out-of-fold calibration, app/calibration.py):
// accuracy against confidence of the top answer, per confidence bin, as a small SVG beside the confusion matrix.
import { el } from "./api.js";

const NS = "http://www.w3.org/2000/svg";
const SIZE = 140;
const PAD = 18;

function svg(tag, attrs = {}) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

const at = (v) => PAD + v * (SIZE - 2 * PAD); // 0..1 on either axis

export function renderReliability(calibration) {
  const r = calibration && calibration.reliability;
  if (!r || !Array.isArray(r.confidence) || !r.confidence.length) return null;
  const plot = svg("svg", { width: SIZE, height: SIZE, viewBox: `0 0 ${SIZE} ${SIZE}`, class: "reliability",
                            role: "img", "aria-label": "reliability diagram" });
  plot.append(svg("rect", { x: PAD, y: PAD, width: SIZE - 2 * PAD, height: SIZE - 2 * PAD, fill: "none", stroke: "#bbb" }));
  plot.append(svg("line", { x1: at(0), y1: at(1), x2: at(1), y2: at(0), stroke: "#999", "stroke-dasharray": "3 3" }));
  const points = r.confidence.map((c, i) => `${at(c)},${SIZE - at(r.accuracy[i])}`).join(" ");
  plot.append(svg("polyline", { points, fill: "none", stroke: "#2a6fb0", "stroke-width": 1.5 }));
  r.confidence.forEach((c, i) => plot.append(svg("circle", { cx: at(c), cy: SIZE - at(r.accuracy[i]), r: 2.5, fill: "#2a6fb0" })));
  const axis = (x, y, text) => { const t = svg("text", { x, y, "font-size": 9, fill: "#555" }); t.textContent = text; return t; };
  plot.append(axis(PAD, SIZE - 4, "confidence →"), axis(2, PAD - 6, "accuracy ↑"));
  const ece = typeof calibration.ece_after === "number" ? calibration.ece_after.toFixed(3) : "–";
  const how = calibration.applied ? `temperature ${Number(calibration.temperature).toFixed(2)}, ECE ${Number(calibration.ece_before).toFixed(3)} → ${ece}`
                                  : `ECE ${ece} (no temperature: it did not lower the ECE)`;
  return el("figure", { class: "reliability" }, plot, el("figcaption", {}, `Reliability, out of fold (n=${calibration.n}): ${how}`));
}
