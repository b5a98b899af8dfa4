// The console's entry point: the keys form, then each part (classify, heads, train).
import { getKeys, headsChanged, setKeys, showStatus } from "./api.js";
import * as classify from "./classify.js";
import * as heads from "./heads.js";
import * as review from "./review.js";
import * as train from "./train.js";

const $ = (id) => document.getElementById(id);

function initKeys() {
  const keys = getKeys();
  $("api-key").value = keys.api;
  $("admin-key").value = keys.admin;
  const status = $("keys-status");
  const describe = () => {
    const k = getKeys();
    return k.api || k.admin ? `Keys kept for this tab: ${[k.api && "API key", k.admin && "admin key"].filter(Boolean).join(" and ")}` : "No keys";
  };
  showStatus(status, describe());
  $("keys-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKeys($("api-key").value.trim(), $("admin-key").value.trim());
    showStatus(status, describe(), "ok");
    headsChanged();
  });
  $("keys-forget").addEventListener("click", () => {
    setKeys("", "");
    $("api-key").value = "";
    $("admin-key").value = "";
    showStatus(status, describe());
    headsChanged();
  });
}

initKeys();
classify.init();
train.init();
review.init();
const setHeads = (models) => {
  classify.setHeads(models);
  review.setHeads(models);
};
heads.init(setHeads);
heads.refresh(setHeads);
