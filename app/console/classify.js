// Classify: drop or pick photos; each gets a thumbnail, its label, top-k bars, the head and version
// that answered and, for heads with familiarity data, the in-distribution verdict.
import { call, dropZone, el, percent, show, showError, showStatus } from "./api.js";

const $ = (id) => document.getElementById(id);
let thumbnails = [];

export function setHeads(models) {
  const select = $("classify-head");
  const previous = select.value;
  const options = models.models.map((m) => el("option", { value: m.name }, m.name));
  show(select, options);
  const names = models.models.map((m) => m.name);
  select.value = names.includes(previous) ? previous : names.includes(models.default) ? models.default : names[0] || "";
}

function bars(result) {
  const rows = result.top_k
    ? result.top_k.map((t) => [t.label, t.probability])
    : Object.entries(result.probabilities || {}).sort((a, b) => b[1] - a[1]);
  return el("ol", { class: "bars", "aria-label": "class probabilities" },
    rows.map(([label, p]) => el("li", {}, el("span", { class: "bar-label" }, label),
      el("progress", { max: "1", value: String(p), "aria-label": `${label} ${percent(p)}` }), el("span", { class: "num" }, percent(p)))));
}

function card(file, result, answer) {
  const url = URL.createObjectURL(file);
  thumbnails.push(url);
  const figure = el("figure", { class: "result" }, el("img", { src: url, alt: `photo ${file.name}` }));
  const caption = el("figcaption", {}, el("div", { class: "file" }, result.file ?? file.name));
  if (result.error) {
    caption.append(el("p", { class: "error" }, `Error ${result.error.status} (${result.error.code}): ${result.error.message}`));
  } else {
    if (result.label !== undefined && result.label !== null) {
      caption.append(el("div", { class: "label" }, result.label), el("div", { class: "confidence" }, `confidence ${percent(result.confidence)}`));
      caption.append(bars(result));
    } else {
      caption.append(el("div", { class: "label ood" }, "not classified (unlike the head's training photos)"));
    }
    if (typeof result.in_distribution === "boolean") {
      caption.append(el("div", { class: result.in_distribution ? "verdict ok" : "verdict ood" },
        result.in_distribution ? "in distribution" : "out of distribution",
        typeof result.familiarity === "number" ? ` (familiarity ${result.familiarity.toFixed(3)})` : ""));
    }
  }
  caption.append(el("div", { class: "answered" }, `answered by ${answer.head} version ${answer.version}`));
  figure.append(caption);
  return figure;
}

async function classify(files) {
  const status = $("classify-status");
  const results = $("classify-results");
  thumbnails.forEach((u) => URL.revokeObjectURL(u));
  thumbnails = [];
  results.replaceChildren();
  const params = new URLSearchParams();
  const head = $("classify-head").value;
  const version = $("classify-version").value.trim();
  const topK = $("classify-topk").value.trim();
  if (head) params.set("head", head);
  if (version) params.set("version", version);
  if (topK) params.set("top_k", topK);
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  showStatus(status, `Classifying ${files.length} photo${files.length === 1 ? "" : "s"}…`);
  try {
    const answer = await call("POST", `v1/classify?${params}`, { form });
    show(results, answer.results.map((r) => card(files[r.index] || files[0], r, answer)));
    showStatus(status, `${answer.results.length} photo${answer.results.length === 1 ? "" : "s"} classified by ${answer.head} version ${answer.version}`, "ok");
  } catch (err) {
    showError(status, err);
  }
}

export function init() {
  dropZone($("classify-drop"), $("classify-files"), classify);
}
