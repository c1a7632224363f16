// A model's card (from GET /v2/models/NAME) and the legends of its classes' colours, and the
// server's state (GET /v2/health/ready, queue depth from GET /metrics).

import { describe, requestJson, requestText } from "./api.js";
import { el, facts } from "./dom.js";

// The overlay's class colours (unet_service/imaging/display.py), for the legend's swatches:
// class k > 0 gets PALETTE[k - 1].
const PALETTE = [
  [255, 64, 64], [64, 160, 255], [255, 200, 0], [0, 200, 120],
  [200, 80, 255], [255, 128, 0], [0, 220, 220], [255, 0, 160],
];

/** The card's validation figures (GET /v2/models/NAME parameters.metrics, see
 * model/card_metrics.py), each with what it measures, grouped by the slices measured on. */
function figures(metrics) {
  const entries = Object.values(metrics || {}).filter((m) => typeof m?.value === "number");
  if (!entries.length) return "none in the model card";
  const box = el("div", { className: "figures" });
  const groups = new Map();
  for (const m of entries) groups.set(m.measured_on, [...(groups.get(m.measured_on) || []), m]);
  for (const [where, group] of groups) {
    const list = el("ul");
    for (const m of group) {
      list.append(
        el(
          "li",
          {},
          el("strong", { className: "figure" }, m.value.toFixed(4)),
          ` ${m.label}`,
          el("span", { className: "hint definition" }, m.definition),
        ),
      );
    }
    box.append(el("p", { className: "where" }, `On ${where}:`), list);
    if (group[0].command) {
      box.append(el("p", { className: "hint" }, "Measured by ", el("code", {}, group[0].command)));
    }
  }
  return box;
}

/** The card's description: its first sentence, the rest (training, known failures) one
 * click away. */
function description(text) {
  if (!text) return "no description in the model card";
  const [, first, rest] = text.match(/^(.+?[.!?])\s+([A-Z].*)$/s) || [null, text, ""];
  if (!rest) return text;
  return el(
    "div",
    { className: "description" },
    el("p", {}, first),
    el("details", {}, el("summary", {}, "How it was trained, where it fails"), el("p", {}, rest)),
  );
}

function threshold(value) {
  return typeof value === "number" ? String(Number(value.toPrecision(3))) : "not in the card";
}

/** The classes the overlay tints, with their colours: [name, [r, g, b]]. */
function tintedClasses(classNames) {
  if (classNames.length === 1) return [[classNames[0], PALETTE[0]]];
  return classNames.slice(1).map((name, i) => [name, PALETTE[i % PALETTE.length]]);
}

/** Shows model `meta`'s card (GET /v2/models/NAME) in `container`. */
export function showCard(container, meta) {
  const p = meta.parameters || {};
  const classes = p.class_names || [];
  container.replaceChildren(
    facts([
      ["Segments", description(p.description)],
      ["Classes", classes.join(", ")],
      ["Threshold", classes.length === 1 ? threshold(p.threshold) : "arg-max over the classes"],
      ["Validation", figures(p.metrics)],
      ["Tile sizes", (p.tile_sizes || []).join(", ")],
    ]),
  );
}

/** The legends of the overlay (each class tinted, with its colour) and of the mask, for a
 * result of model `meta` (null: none known). */
export function showLegends(overlayLegend, maskLegend, meta) {
  overlayLegend.replaceChildren();
  const classes = meta?.parameters?.class_names || [];
  for (const [name, [r, g, b]] of tintedClasses(classes)) {
    const swatch = el("span", { className: "swatch" });
    swatch.style.background = `rgb(${r}, ${g}, ${b})`;
    overlayLegend.append(swatch, ` ${name} `);
  }
  const alone = { 0: "", 1: `white: ${classes[0]}` }[classes.length];
  maskLegend.textContent = alone ?? "colours as in the overlay";
}

function gauge(text, name) {
  const match = text.match(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "m"));
  return match ? Number(match[1]) : null;
}

/** Shows the server's state and queue; resolves to whether it is ready. */
export async function refreshServer(stateEl, queueEl) {
  try {
    const { ready } = await requestJson("/v2/health/ready", { allow: [503] });
    stateEl.textContent = ready ? "Ready" : "Not ready (loading or shutting down)";
    const text = await requestText("/metrics");
    const tiles = gauge(text, "unet_queue_tiles");
    const images = gauge(text, "unet_queue_images");
    queueEl.textContent =
      tiles === null
        ? "unknown"
        : `${images} image${images === 1 ? "" : "s"}, ${tiles} tile${tiles === 1 ? "" : "s"} waiting`;
    return ready;
  } catch (error) {
    stateEl.textContent = describe(error);
    queueEl.textContent = "unknown";
    return false;
  }
}
