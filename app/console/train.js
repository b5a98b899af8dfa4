// Create or retrain a head: classes with their photos (add a class, name it, drop photos), options,
// then train (a job: watch its progress, see its report) or only add the photos as examples.
import { call, dropZone, el, headsChanged, path, show, showError, showStatus } from "./api.js";
import { renderReport } from "./report.js";

const $ = (id) => document.getElementById(id);
const classes = []; // [{row, input, files: File[]}]
let counter = 0;
let polling = null;

function renderFiles(entry) {
  const n = entry.files.length;
  entry.count.textContent = `${n} photo${n === 1 ? "" : "s"}`;
  show(entry.list, entry.files.map((f) => el("li", {}, f.name)));
}

// After a training or an examples upload the photos are in the head's example store: the lists
// empty, so a retraining sends only new photos and reuses those.
function clearFiles() {
  for (const entry of classes) {
    entry.files = [];
    renderFiles(entry);
  }
}

function addClass() {
  counter += 1;
  const id = `class-${counter}`;
  const label = el("input", { id: `${id}-label`, type: "text", class: "class-label", spellcheck: "false", autocomplete: "off" });
  const input = el("input", { id: `${id}-files`, type: "file", multiple: true, accept: "image/*", class: "class-files" });
  const remove = el("button", { type: "button", class: "remove-class" }, "Remove class");
  const count = el("span", { class: "count" }, "0 photos");
  const list = el("ul", { class: "files" });
  const zone = el("div", { class: "drop" }, el("label", { for: input.id }, "Drop this class's photos here, or choose them:"), input, " ", count);
  const row = el("div", { class: "class-row", "data-class": String(counter) },
    el("div", { class: "row" }, el("label", { for: label.id }, "Class label"), label, remove), zone, list);
  const entry = { row, label, count, list, files: [] };
  dropZone(zone, input, (files) => {
    entry.files.push(...files);
    renderFiles(entry);
  });
  remove.addEventListener("click", () => {
    classes.splice(classes.indexOf(entry), 1);
    row.remove();
  });
  classes.push(entry);
  $("train-classes").append(row);
  label.focus();
}

// The person's mistakes, named before anything is uploaded. Labels and names themselves are checked
// by the server (the same rules as everywhere); its message is shown as it is.
function collect(forTraining) {
  const name = $("train-name").value.trim();
  if (!name) throw new Error("give the head a name");
  const seen = new Set();
  const form = new FormData();
  let photos = 0;
  classes.forEach((entry, i) => {
    const label = entry.label.value.trim();
    if (!label && !entry.files.length) return; // an untouched empty row
    if (!label) throw new Error(`class ${i + 1} has ${entry.files.length} photos but no label`);
    if (seen.has(label)) throw new Error(`two classes are both labelled "${label}"`);
    seen.add(label);
    if (!entry.files.length) throw new Error(`class "${label}" has no photos: drop some or remove the class`);
    for (const file of entry.files) form.append(label, file, file.name);
    photos += entry.files.length;
  });
  if (!photos) throw new Error("add at least one class with photos");
  if (forTraining) {
    const c = $("train-c").value.trim() || "auto";
    form.append("c", c);
    form.append("val_fraction", $("train-val").value.trim() || "0.2");
    form.append("promote", $("train-promote").checked ? "true" : "false");
    form.append("use_examples", $("train-use-examples").checked ? "true" : "false");
  }
  return { name, form, photos, labels: seen.size };
}

function renderJob(job) {
  const p = job.progress || {};
  const done = typeof p.done === "number" ? p.done : 0;
  const total = typeof p.total === "number" ? p.total : 0;
  const parts = [
    el("h3", {}, `Job ${job.id} for ${job.head}`),
    el("p", { class: "job-state", "data-state": job.state }, `State: ${job.state}`),
  ];
  if (job.state === "queued" || job.state === "running") {
    parts.push(el("p", { class: "job-progress" }, `${p.phase || "waiting"}: ${done} / ${total}`,
      typeof p.images_per_s === "number" ? ` (${p.images_per_s.toFixed(1)} photos/s)` : ""));
    parts.push(el("progress", { class: "job", max: String(Math.max(total, 1)), value: String(done), "aria-label": "training progress" }));
  }
  if (job.state === "succeeded") {
    parts.push(el("p", { class: "job-version ok" }, `Version ${job.version} created${job.promoted ? " and served" : " (not promoted)"}`));
    parts.push(renderReport(job.report, `Version ${job.version}: validation report`));
  }
  if (job.state === "failed" && job.error) {
    parts.push(el("p", { class: "error", role: "alert" }, `Error (${job.error.code}): ${job.error.message}`));
  }
  show($("train-job"), parts);
}

async function watch(job) {
  renderJob(job);
  while (job.state === "queued" || job.state === "running") {
    await new Promise((resolve) => { polling = setTimeout(resolve, 500); });
    try {
      job = await call("GET", path`v1/jobs/${job.id}`);
    } catch (err) {
      showError($("train-status"), err);
      return;
    }
    renderJob(job);
  }
  if (job.state === "succeeded") {
    clearFiles();
    showStatus($("train-status"), `Training of ${job.head} succeeded; its photos are kept in the head's examples, ` +
      "so a retraining needs only the new ones", "ok");
  } else {
    showStatus($("train-status"), `Training of ${job.head} failed`, "error");
  }
  headsChanged();
}

async function train(event) {
  event.preventDefault();
  const status = $("train-status");
  let request;
  try {
    request = collect(true);
  } catch (err) {
    showError(status, err);
    return;
  }
  clearTimeout(polling);
  $("train-job").replaceChildren();
  showStatus(status, `Uploading ${request.photos} photos of ${request.labels} classes to train ${request.name}…`);
  try {
    const job = await call("POST", path`v1/heads/${request.name}/train`, { form: request.form, admin: true });
    showStatus(status, `Training ${request.name}…`);
    await watch(job);
  } catch (err) {
    showError(status, err);
  }
}

async function addExamples() {
  const status = $("train-status");
  let request;
  try {
    request = collect(false);
  } catch (err) {
    showError(status, err);
    return;
  }
  showStatus(status, `Uploading ${request.photos} photos to ${request.name}'s examples…`);
  try {
    const r = await call("POST", path`v1/heads/${request.name}/examples`, { form: request.form, admin: true });
    const counts = Object.entries(r.examples || {}).map(([label, n]) => `${label}: ${n}`).join(", ");
    clearFiles();
    showStatus(status, `Added ${r.added} photos (${r.duplicates} already there); ${r.head} now has ${counts}`, "ok");
  } catch (err) {
    showError(status, err);
  }
}

export function init() {
  $("train-add-class").addEventListener("click", addClass);
  $("train-form").addEventListener("submit", train);
  $("train-examples").addEventListener("click", addExamples);
  addClass();
  addClass();
  $("train-name").focus();
}
