// The page: images in a queue, each sent to POST /v1/segment (one at a time), its result
// shown in the three views, downloads from the same API.

import { apiKey, describe, segment, setApiKey } from "./api.js";
import { el } from "./dom.js";
import { cellsTint, maskCanvases, previewCanvas } from "./render.js";
import { loadModel, refreshServer, tintedClasses } from "./status.js";
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000;
const NO_PREVIEW = "The browser cannot show this file; the overlay shows the mask alone.";

const jobs = [];
let model = null;
let current = null; // the job whose result is shown
let modelLater = false; // the card could not be had yet (server loading or unreachable)
let busy = false;
const viewer = new Viewer(document.querySelectorAll(".viewport"), (zoom) => {
  $("zoom-level").textContent = `Zoom ${Math.round(zoom * 100)}%`;
});

function announce(text) {
  $("announce").textContent = text;
}

function stem(name) {
  return name.replace(/\.[^.]*$/, "") || "image";
}

function percent(part, whole) {
  return `${Math.round((100 * part) / whole)}%`;
}

function saveBlob(blob, filename) {
  const link = el("a", { href: URL.createObjectURL(blob), download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
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

/** A button that asks the API for another output of the same file and saves it. */
function downloadButton(job, output, filename, label) {
  const button = el("button", { type: "button" }, label);
  button.addEventListener("click", async () => {
    const saved = job.outputs[output];
    if (saved) {
      saveBlob(saved, saved.type === "image/tiff" ? filename.replace(/\.png$/, ".tif") : filename);
      return;
    }
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    const show = (text) => {
      button.textContent = `${label}: ${text}`;
    };
    try {
      const { blob } = await segment(job.file, output, {
        onUpload: (loaded, total) => show(`uploading ${percent(loaded, total)}`),
        onComputing: () => show("computing…"),
        onRetry: (left) => show(`server busy, retrying in ${left} s`),
      });
      job.outputs[output] = blob;
      // Instances beyond 65535 cells come as a 32-bit TIFF instead of a 16-bit PNG.
      saveBlob(blob, blob.type === "image/tiff" ? filename.replace(/\.png$/, ".tif") : filename);
      $("download-error").textContent = "";
    } catch (error) {
      $("download-error").textContent = describe(error);
    } finally {
      button.textContent = label;
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  });
  return button;
}

/** The overlay's tint: the classes, or with "Colour each cell" every cell instance in its
 * own colour (the API's instances of the same file, asked for once). */
async function showLayers(job) {
  const { result } = job;
  const cells = $("cells").checked && hasInstances();
  let tint = result.layers.tint;
  if (cells) {
    if (!result.cellsTint) {
      const width = result.width;
      const height = result.height;
      if (!job.outputs.instances) {
        job.outputs.instances = (await segment(job.file, "instances", {})).blob;
      }
      result.cellsTint = await cellsTint(job.outputs.instances, width, height);
    }
    tint = result.cellsTint;
  }
  if (current !== job) return; // another image was chosen meanwhile
  viewer.show({ image: result.preview, ...result.layers, tint }, NO_PREVIEW, true);
  document.querySelector("[data-panel=overlay]").dataset.colouring = cells ? "cells" : "classes";
  $("legend").hidden = cells;
  $("cells-legend").hidden = !cells;
}

function display(job) {
  const { result, file } = job;
  current = job;
  $("cells-control").hidden = !hasInstances();
  viewer.show({ image: result.preview, ...result.layers }, NO_PREVIEW);
  if ($("cells").checked && hasInstances()) {
    showLayers(job).catch((error) => {
      $("download-error").textContent = describe(error);
    });
  }
  $("result-name").textContent = file.name;
  $("empty").hidden = true;
  const name = stem(file.name);
  // A stack's mask is one multi-page TIFF with every page (the views show the first).
  const mask = result.pages > 1
    ? el("a", { href: result.maskUrl, download: `${name}_mask.tif` }, "Download mask (TIFF, all pages)")
    : el("a", { href: result.maskUrl, download: `${name}_mask.png` }, "Download mask (PNG)");
  $("downloads").replaceChildren(
    mask,
    downloadButton(job, "probabilities", `${name}_probabilities.npy`, "Download probabilities (.npy)"),
    downloadButton(job, "overlay", `${name}_overlay.png`, "Download overlay (PNG)"),
    ...(hasInstances()
      ? [downloadButton(job, "instances", `${name}_instances.png`, "Download cell instances (PNG)")]
      : []),
    el("p", { id: "download-error", className: "error", role: "alert" }),
  );
  $("downloads").hidden = false;
  for (const other of jobs) {
    other.item.classList.toggle("current", other === job);
    other.show.setAttribute("aria-pressed", String(other === job));
  }
}

async function process(job) {
  const { file, status, progress } = job;
  const say = (text) => {
    status.textContent = text;
  };
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
    const [preview, layers] = await Promise.all([
      previewCanvas(file, width, height),
      maskCanvases(blob, classes, width, height),
    ]);
    const pages = Number(headers.get("X-Pages") || 1);
    job.result = { preview, layers, width, height, pages, maskUrl: URL.createObjectURL(blob) };
    progress.value = 1;
    const seconds = (Number(headers.get("X-Total-Ms")) / 1000).toFixed(2);
    const tiles = headers.get("X-Tiles");
    const stack = pages > 1 ? `, ${pages} pages (the first shown)` : "";
    say(`Done: ${width} × ${height} pixels${stack}, ${tiles} tile${tiles === "1" ? "" : "s"}, ${seconds} s`);
    job.show.hidden = false;
    display(job);
    announce(`${file.name} segmented`);
  } catch (error) {
    progress.hidden = true;
    status.classList.add("error");
    say(describe(error));
    // Worth another try after a key is entered or the server recovers; not for the file itself.
    job.retry.hidden = [413, 415, 422].includes(error.status);
    announce(`${file.name}: ${describe(error)}`);
  }
}

function retry(job) {
  job.retry.hidden = true;
  job.progress.hidden = false;
  job.progress.value = 0;
  job.status.classList.remove("error");
  job.status.textContent = "Waiting";
  job.started = false;
  work();
}

async function work() {
  if (busy) return;
  busy = true;
  try {
    for (let job = jobs.find((j) => !j.started); job; job = jobs.find((j) => !j.started)) {
      job.started = true;
      await process(job);
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
    const item = el("li", { className: "job" }, name, progress, status, show, again);
    const job = { file, item, status, progress, show, retry: again, outputs: {}, started: false };
    show.addEventListener("click", () => display(job));
    again.addEventListener("click", () => retry(job));
    jobs.push(job);
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
    if (!current) return;
    $("cells").disabled = true;
    showLayers(current)
      .catch((error) => {
        $("download-error").textContent = describe(error);
      })
      .finally(() => {
        $("cells").disabled = false;
      });
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
