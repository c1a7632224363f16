// A segmented file's other outputs from the same API (probabilities, overlay, cell
// instances): each asked for once, and downloaded under a name and a label that say the
// format the server actually sent.

import { describe, segment } from "./api.js";
import { el, percent, saveBlob, stem } from "./dom.js";

const TIFF = "image/tiff";

/** The API's `output` for the entry's file as a Blob, from the entry's model, asked for
 * once: callers at the same time share the request (a failed one is asked for again next
 * time). */
export function fetchOutput(entry, output, handlers = {}) {
  if (!entry.outputs[output]) {
    const asked = { output, model: entry.model };
    const pending = segment(entry.file, asked, handlers).then(({ blob }) => {
      entry.relabel?.[output]?.(blob.type); // its download button now knows the format
      return blob;
    });
    entry.outputs[output] = pending;
    pending.catch(() => {
      if (entry.outputs[output] === pending) delete entry.outputs[output];
    });
  }
  return entry.outputs[output];
}

/**
 * What a download of `output` saves: {extension, format} for the button's label. A stack's
 * answers are multi-page TIFFs (probabilities one .npy); one image's mask and overlay are
 * PNGs, its cell instances a 16-bit PNG, or a 32-bit TIFF beyond 65535 cells, which only
 * the answer's type (`type`, once it is known) tells.
 */
export function downloadFormat(output, pages, type = null) {
  if (output === "probabilities") {
    return { extension: "npy", format: pages > 1 ? ".npy, all pages" : ".npy" };
  }
  if (pages > 1) return { extension: "tif", format: "TIFF, all pages" };
  if (output !== "instances") return { extension: "png", format: "PNG" };
  if (type === null) return { extension: "png", format: "PNG; TIFF beyond 65535 cells" };
  return type === TIFF ? { extension: "tif", format: "TIFF" } : { extension: "png", format: "PNG" };
}

const NAMES = { probabilities: "probabilities", overlay: "overlay", instances: "cell instances" };

/** A button that asks the API for another output of the same file and saves it. */
export function downloadButton(entry, output, pages, errorLine) {
  const name = NAMES[output];
  const label = (type) => `Download ${name} (${downloadFormat(output, pages, type).format})`;
  const button = el("button", { type: "button" }, label(null));
  entry.relabel = { ...entry.relabel, [output]: (type) => (button.textContent = label(type)) };
  entry.outputs[output]?.then((blob) => (button.textContent = label(blob.type)), () => {});
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    const show = (text) => {
      button.textContent = `${label(null)}: ${text}`;
    };
    let type = null;
    try {
      const blob = await fetchOutput(entry, output, {
        onUpload: (loaded, total) => show(`uploading ${percent(loaded, total)}`),
        onComputing: () => show("computing…"),
        onRetry: (left) => show(`server busy, retrying in ${left} s`),
      });
      type = blob.type;
      const { extension } = downloadFormat(output, pages, type);
      saveBlob(blob, `${stem(entry.file.name)}_${output}.${extension}`);
      errorLine.textContent = "";
    } catch (error) {
      errorLine.textContent = describe(error);
    } finally {
      button.textContent = label(type);
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  });
  return button;
}

/** The downloads of a segmented entry: the mask it was shown with, and the other outputs. */
export function downloads(entry, withInstances) {
  const { pages, maskUrl } = entry.result;
  const name = stem(entry.file.name);
  const mask = downloadFormat("mask", pages);
  const errorLine = el("p", { id: "download-error", className: "error", role: "alert" });
  return [
    el(
      "a",
      { href: maskUrl, download: `${name}_mask.${mask.extension}` },
      `Download mask (${mask.format})`,
    ),
    downloadButton(entry, "probabilities", pages, errorLine),
    downloadButton(entry, "overlay", pages, errorLine),
    ...(withInstances ? [downloadButton(entry, "instances", pages, errorLine)] : []),
    errorLine,
  ];
}
