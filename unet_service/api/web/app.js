// The page: images in a queue, each sent to POST /v1/segment (one at a time), its result
// shown in the three views as the server renders them (POST /v1/preview, render.js),
// downloads from the same API; an image too large for a request (413) can go to the job API
// instead (sectionjob.js).

import { apiKey, describe, segment, setApiKey } from "./api.js";
import { el, percent } from "./dom.js";
import { downloads, fetchOutput } from "./outputs.js";
import { imageCanvas, maskCanvas, tintCanvas } from "./render.js";
import { runAsJob } from "./sectionjob.js";
import { loadModel, refreshServer, tintedClasses } from "./status.js";
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000;

const entries = []; // the files chosen, in order: {file, item, status, progress, ...}
let model = null;
let current = null; // the entry whose result is shown
let modelLater = false; // the card could not be had yet (server loading or unreachable)
let busy = false;
const viewer = new Viewer(document.querySelectorAll(".viewport"), (zoom) => {
  $("zoom-level").textContent = `Zoom ${Math.round(zoom * 100)}%`;
});

function announce(text) {
  $("announce").textContent = text;
}

async function refreshModel() {
  try {
    model = await loadModel($("model"));
    modelLater = false;
  } catch (error) {
    model = null;
    modelLater = error.status === 0 || error.status === 503;
  }
  const legend = $("legend");
  legend.replaceChildren();
  const classes = model?.parameters?.class_names || [];
  for (const [name, [r, g, b]] of tintedClasses(classes)) {
    const swatch = el("span", { className: "swatch" });
    swatch.style.background = `rgb(${r}, ${g}, ${b})`;
    legend.append(swatch, ` ${name} `);
  }
  const alone = { 0: "", 1: `white: ${classes[0]}` }[classes.length];
  $("mask-legend").textContent = alone ?? "colours as in the overlay";
}

/** Whether the model offers cell instances (one-class models do). */
function hasInstances() {
  return Boolean(model?.outputs?.some((o) => o.name === "instances"));
}

function refreshState() {
  return refreshServer($("server-state"), $("server-queue"));
}

/** The overlay's tint: the classes, or with "Colour each cell" every cell instance in its
 * own colour (the API's instances of the same file, asked for once). */
async function showLayers(entry) {
  const { result } = entry;
  const cells = $("cells").checked && hasInstances();
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
      result.cellsTint = await tintCanvas(blob, "instances");
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
  const { result, file } = entry;
  current = entry;
  $("cells-control").hidden = !hasInstances();
  viewer.show({ image: result.image, ...result.layers });
  if ($("cells").checked && hasInstances()) colourCells(entry);
  $("result-name").textContent = file.name;
  $("empty").hidden = true;
  $("downloads").replaceChildren(...downloads(entry, hasInstances()));
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
  const shown = imageCanvas(file);
  shown.catch(() => {});
  try {
    const { blob, headers } = await segment(file, "mask", {
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
    if (!model) await refreshModel(); // a key entered after the page loaded
    const width = Number(headers.get("X-Image-Width"));
    const height = Number(headers.get("X-Image-Height"));
    const classes = model?.parameters?.class_names?.length || 1;
    const [image, tint] = await Promise.all([shown, tintCanvas(blob, "classes")]);
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
    const actions = el("div", { className: "actions" });
    const item = el("li", { className: "job" }, name, progress, status, show, again, actions);
    const entry = {
      file, item, status, progress, show, actions, retry: again, outputs: {}, started: false,
    };
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
  key.addEventListener("change", () => refreshModel());

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

  refreshModel();
  refreshState();
  setInterval(async () => {
    if (document.hidden) return;
    const ready = await refreshState();
    if (ready && modelLater) refreshModel();
  }, REFRESH_MS);
}

setUp();
