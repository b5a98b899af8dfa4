// Review: a head's review queue from production (uncertain and unfamiliar answers the server sampled).
// Each photo with the head's guess: one click confirms it or picks the right class (it joins the head's
// example store), or dismisses it; then retrain, compare and promote in the Heads panel as usual.
import { call, el, headsChanged, path, percent, photo, show, showError, showStatus } from "./api.js";

const $ = (id) => document.getElementById(id);
let urls = [];

export function setHeads(models) {
  const select = $("review-head");
  const previous = select.value;
  show(select, models.models.map((m) => el("option", { value: m.name }, m.name)));
  const names = models.models.map((m) => m.name);
  select.value = names.includes(previous) ? previous : names[0] || "";
}

async function label(name, item, chosen, figure) {
  const status = $("review-status");
  try {
    const r = await call("POST", path`v1/heads/${name}/review/${item.sha256}/label`, { json: { label: chosen }, admin: true });
    figure.remove();
    const counts = Object.entries(r.examples || {}).map(([l, n]) => `${l}: ${n}`).join(", ");
    showStatus(status, `${r.confirmed ? "Confirmed" : "Corrected to"} ${r.label}; ${name}'s examples now: ${counts}`, "ok");
  } catch (err) {
    showError(status, err);
  }
}

async function dismiss(name, item, figure) {
  try {
    await call("DELETE", path`v1/heads/${name}/review/${item.sha256}`, { admin: true });
    figure.remove();
    showStatus($("review-status"), "Dismissed: the photo is deleted", "ok");
  } catch (err) {
    showError($("review-status"), err);
  }
}

function card(name, item) {
  const img = el("img", { alt: `photo the head answered ${item.label}` });
  const figure = el("figure", { class: "result review-item", "data-sha": item.sha256 }, img);
  photo(item.photo.replace(/^\//, "")).then((blob) => {
    const url = URL.createObjectURL(blob);
    urls.push(url);
    img.src = url;
  }).catch(() => img.setAttribute("alt", "photo unavailable"));
  const why = item.reason === "unfamiliar" ? "unlike the training photos" : `margin ${percent(item.margin)}`;
  const buttons = Object.keys(item.probabilities).map((c) => {
    const b = el("button", { type: "button", class: c === item.label ? "confirm" : "pick", "data-label": c },
      c === item.label ? `Confirm ${c}` : c);
    b.addEventListener("click", () => label(name, item, c, figure));
    return b;
  });
  const drop = el("button", { type: "button", class: "dismiss" }, "Dismiss");
  drop.addEventListener("click", () => dismiss(name, item, figure));
  figure.append(el("figcaption", {},
    el("div", { class: "label" }, item.label), el("div", { class: "confidence" }, `confidence ${percent(item.confidence)}`),
    el("div", { class: "reason" }, `${item.reason}: ${why}`),
    el("div", { class: "answered" }, `answered by version ${item.version}, seen ${item.seen}×`),
    el("div", { class: "actions" }, buttons, drop)));
  return figure;
}

async function load() {
  const name = $("review-head").value;
  const status = $("review-status");
  urls.forEach((u) => URL.revokeObjectURL(u));
  urls = [];
  $("review-items").replaceChildren();
  if (!name) return;
  showStatus(status, `Reading ${name}'s review queue…`);
  try {
    const r = await call("GET", path`v1/heads/${name}/review`, { admin: true });
    show($("review-items"), r.items.map((item) => card(name, item)));
    showStatus(status, `${r.count} photo${r.count === 1 ? "" : "s"} to review for ${name}` +
      (r.enabled ? "" : " (sampling is off for this head: TLSERVE_REVIEW_HEADS)"), "ok");
  } catch (err) {
    showError(status, err);
  }
}

async function retrain() {
  const name = $("review-head").value;
  const status = $("review-status");
  const form = new FormData();
  form.append("use_examples", "true");
  form.append("promote", "false");
  try {
    const job = await call("POST", path`v1/heads/${name}/train`, { form, admin: true });
    showStatus(status, `Retraining ${name} on its examples (job ${job.id}); the new version appears under Heads, not promoted`, "ok");
    let state = job;
    while (state.state === "queued" || state.state === "running") {
      await new Promise((resolve) => setTimeout(resolve, 500));
      state = await call("GET", path`v1/jobs/${job.id}`);
    }
    if (state.state === "succeeded") {
      const n = state.report && typeof state.report.n_train === "number" ? `${state.report.n_train} training photos` : "";
      showStatus(status, `Version ${state.version} of ${name} trained${n ? ` (${n})` : ""}: compare and promote it under Heads`, "ok");
    } else {
      showStatus(status, `Retraining failed: ${state.error ? state.error.message : state.state}`, "error");
    }
    headsChanged();
  } catch (err) {
    showError(status, err);
  }
}

export function init() {
  $("review-load").addEventListener("click", load);
  $("review-retrain").addEventListener("click", retrain);
}
