// The page: images in a queue, each sent to POST /v1/segment (one at a time) with the model
// chosen when it was added (models.js), its result shown in the three views as the server
// renders them (POST /v1/preview, render.js), downloads from the same API and model; an image
// too large for a request (413) can go to the job API instead (sectionjob.js).

import { apiKey, describe, segment, setApiKey } from "./api.js";
import { el, percent } from "./dom.js";
import { ModelPanel } from "./modelpanel.js";
import { cardOf } from "./models.js";
import { downloads, fetchOutput } from "./outputs.js";
import { imageCanvas, maskCanvas, tintCanvas } from "./render.js";
import { runAsJob } from "./sectionjob.js";
import { refreshServer, showLegends } from "./status.js";
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000;

const entries = []; // the files chosen, in order: {file, model, card, item, status, ...}
let current = null; // the entry whose result is shown
// The model picker and card; the legends follow the chosen model until a result is shown.
const models = new ModelPanel($("model-choice"), $("model-card"), (card) => {
  if (!current) legends(card);
});
let busy = false;
const viewer = new Viewer(document.querySelectorAll(".viewport"), (zoom) => {
  $("zoom-level").textContent = `Zoom ${Math.round(zoom * 100)}%`;
});

function announce(text) {
  $("announce").textContent = text;
}

function legends(card) {
  showLegends($("legend"), $("mask-legend"), card);
}

/** Whether results of model `card` offer cell instances (one-class models' do). */
function hasInstances(card) {
  return Boolean(card?.outputs?.some((o) => o.name === "instances"));
}

function refreshState() {
  return refreshServer($("server-state"), $("server-queue"));
}

/** The overlay's tint: the classes, or with "Colour each cell" every cell instance in its
 * own colour (the API's instances of the same file, asked for once). */
async function showLayers(entry) {
  const { result } = entry;
  const cells = $("cells").checked && hasInstances(entry.card);
  let tint = result.layers.tint;
  if (cells) {
    if (!result.cellsTint) {
      const say = (text) => {
        $("cells-status").textContent = text;
      };
      const blob = await fetchOutput(entry, "instances", {
        onUpload: (loaded, total) => say(`uploading ${percent(loaded, total)}`),
        onComputing: () => say("computing the cells…"),
        onRetry: (left, error) => say(`${describe(error)}. Retrying in ${left} s.`),
      });
      result.cellsTint = await tintCanvas(blob, "instances", entry.model);
    }
    tint = result.cellsTint;
  }
  if (current !== entry) return; // another image was chosen meanwhile
  viewer.show({ image: result.image, ...result.layers, tint }, true);
  document.querySelector("[data-panel=overlay]").dataset.colouring = cells ? "cells" : "classes";
  $("legend").hidden = cells;
  $("cells-legend").hidden = !cells;
}

/** "Colour each cell" for the entry shown: its progress and errors beside the box. */
function colourCells(entry) {
  $("cells").disabled = true;
  $("cells-status").classList.remove("error");
  showLayers(entry)
    .then(() => {
      $("cells-status").textContent = "";
    })
    .catch((error) => {
      $("cells-status").classList.add("error");
      $("cells-status").textContent = describe(error);
    })
    .finally(() => {
      $("cells").disabled = false;
    });
}

function display(entry) {
  const { result, file, card } = entry;
  current = entry;
  $("cells-control").hidden = !hasInstances(card);
  viewer.show({ image: result.image, ...result.layers });
  if ($("cells").checked && hasInstances(card)) colourCells(entry);
  $("result-name").textContent = file.name;
  $("result-model").textContent = models.several ? `model ${entry.model}` : "";
  legends(card);
  $("empty").hidden = true;
  $("downloads").replaceChildren(...downloads(entry, hasInstances(card)));
  $("downloads").hidden = false;
  for (const other of entries) {
    other.item.classList.toggle("current", other === entry);
    other.show.setAttribute("aria-pressed", String(other === entry));
  }
}

async function process(entry) {
  const { file, status, progress } = entry;
  const say = (text) => {
    status.textContent = text;
  };
  // The server's rendering of the file, asked for beside its segmentation (it does not wait
  // for the tile queue); a refusal of the file is reported by the segmentation's answer.
  const shown = imageCanvas(file, entry.model);
  shown.catch(() => {});
  try {
    const { blob, headers } = await segment(file, { output: "mask", model: entry.model }, {
      onUpload: (loaded, total) => {
        progress.value = loaded / total;
        say(`Uploading ${percent(loaded, total)}`);
      },
      onComputing: () => {
        progress.removeAttribute("value");
        say("Computing…");
      },
      onRetry: (left, error) => {
        progress.value = 0;
        say(`${describe(error)}. Retrying in ${left} s.`);
      },
    });
    // The model that answered (the server's default when the page knew none: a key entered
    // after the page loaded); the entry's other outputs come from it too.
    entry.setModel(headers.get("X-Model-Name"));
    entry.card = await cardOf(entry.model).catch(() => null); // null: shown as one class
    const width = Number(headers.get("X-Image-Width"));
    const height = Number(headers.get("X-Image-Height"));
    const classes = entry.card?.parameters?.class_names?.length || 1;
    const [image, tint] = await Promise.all([shown, tintCanvas(blob, "classes", entry.model)]);
    const layers = { tint, mask: maskCanvas(tint, classes === 1), step: width / tint.width };
    const pages = Number(headers.get("X-Pages") || 1);
    entry.result = { image, layers, width, height, pages, maskUrl: URL.createObjectURL(blob) };
    progress.value = 1;
    const seconds = (Number(headers.get("X-Total-Ms")) / 1000).toFixed(2);
    const tiles = headers.get("X-Tiles");
    const stack = pages > 1 ? `, ${pages} pages (the first shown)` : "";
    say(`Done: ${width} × ${height} pixels${stack}, ${tiles} tile${tiles === "1" ? "" : "s"}, ${seconds} s`);
    entry.show.hidden = false;
    display(entry);
    announce(`${file.name} segmented`);
  } catch (error) {
    progress.hidden = true;
    status.classList.add("error");
    say(describe(error));
    // Worth another try after a key is entered or the server recovers; not for the file itself.
    entry.retry.hidden = [413, 415, 422].includes(error.status);
    if (error.status === 413) offerJob(entry);
    announce(`${file.name}: ${describe(error)}`);
  }
}

/** Too large for a request: the job API takes it in the background. */
function offerJob(entry) {
  const run = el("button", { type: "button" }, "Run as a background job");
  run.setAttribute("aria-label", `Run ${entry.file.name} as a background job`);
  run.addEventListener("click", () => {
    entry.actions.replaceChildren();
    runAsJob(entry).finally(() => refreshState());
  });
  entry.actions.replaceChildren(run);
}

function retry(entry) {
  entry.retry.hidden = true;
  entry.progress.hidden = false;
  entry.progress.value = 0;
  entry.status.classList.remove("error");
  entry.status.textContent = "Waiting";
  entry.started = false;
  work();
}

async function work() {
  if (busy) return;
  busy = true;
  try {
    const next = () => entries.find((e) => !e.started);
    for (let entry = next(); entry; entry = next()) {
      entry.started = true;
      await process(entry);
      refreshState();
      if (models.several) models.refresh(); // its model may have been loaded for it
    }
  } finally {
    busy = false;
  }
}

function addFiles(files) {
  for (const file of files) {
    const progress = el("progress", { max: 1, value: 0 });
    progress.setAttribute("aria-label", `Progress of ${file.name}`);
    const status = el("p", { className: "status" }, "Waiting");
    const show = el("button", { type: "button", hidden: true }, "Show");
    show.setAttribute("aria-label", `Show ${file.name}`);
    const again = el("button", { type: "button", hidden: true }, "Try again");
    again.setAttribute("aria-label", `Try ${file.name} again`);
    const name = el("span", { className: "file" }, file.name);
    const model = el("span", { className: "model hint" });
    const actions = el("div", { className: "actions" });
    const parts = [name, model, progress, status, show, again, actions];
    const item = el("li", { className: "job" }, ...parts);
    const entry = {
      file, item, status, progress, show, actions, retry: again, outputs: {}, started: false,
    };
    // The model the entry is sent to (shown when the server has several): the one chosen
    // now, then the one the server says answered.
    entry.setModel = (value) => {
      entry.model = value;
      model.textContent = value && models.several ? `Model: ${value}` : "";
    };
    entry.setModel(models.name);
    show.addEventListener("click", () => display(entry));
    again.addEventListener("click", () => retry(entry));
    entries.push(entry);
    $("jobs").append(item);
  }
  work();
}

function setUp() {
  const key = $("api-key");
  key.value = apiKey();
  key.addEventListener("input", () => setApiKey(key.value.trim()));
  key.addEventListener("change", () => models.refresh());

  const input = $("files");
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("dragging");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dragging");
    addFiles(e.dataTransfer.files);
  });
  // A file dropped beside the zone must not replace the page.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());

  $("cells").addEventListener("change", () => {
    if (current) colourCells(current);
  });
  const opacity = $("opacity");
  opacity.addEventListener("input", () => {
    viewer.setOpacity(opacity.value / 100);
    $("opacity-value").textContent = `${opacity.value}%`;
  });
  viewer.setOpacity(opacity.value / 100);
  $("zoom-in").addEventListener("click", () => viewer.zoom(1.25, ...viewer.centre()));
  $("zoom-out").addEventListener("click", () => viewer.zoom(0.8, ...viewer.centre()));
  $("zoom-fit").addEventListener("click", () => viewer.fit());

  models.refresh();
  refreshState();
  setInterval(async () => {
    if (document.hidden) return;
    const ready = await refreshState();
    if (ready && (models.later || models.name)) models.refresh(); // the models' states too
  }, REFRESH_MS);
}

setUp();
