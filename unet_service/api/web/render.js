// Canvases for the three views: the upload as the browser can show it, the mask, and the
// mask's tint for the overlay. Huge images are shown at a reduced size (every step-th pixel);
// the downloads are always the server's full-size answers.

import { decodePng16, pngBitDepth } from "./png16.js";
import { decodeTiff } from "./tiff.js";

// The server's overlay colours (app/encoding.py): class k > 0 gets PALETTE[k - 1].
export const PALETTE = [
  [255, 64, 64], [64, 160, 255], [255, 200, 0], [0, 200, 120],
  [200, 80, 255], [255, 128, 0], [0, 220, 220], [255, 0, 160],
];
const MAX_VIEW_PIXELS = 4096 * 4096;

export function viewStep(width, height) {
  return Math.max(1, Math.ceil(Math.sqrt((width * height) / MAX_VIEW_PIXELS)));
}

function canvas(width, height) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  return c;
}

function isTiff(head) {
  const start = String.fromCharCode(...head.subarray(0, 4));
  return ["II*\0", "MM\0*", "II+\0", "MM\0+"].includes(start);
}

/** Decoded samples -> canvas, as the server's overlay shows them: 8-bit as is, 16-bit and
 * float stretched from their minimum to their maximum, alpha dropped. */
function samplesCanvas(p) {
  const kept = p.channels === 2 || p.channels === 4 ? p.channels - 1 : p.channels;
  const n = p.outWidth * p.outHeight;
  let lo = 0;
  let hi = 255;
  if (!p.eightBit) {
    lo = Infinity;
    hi = -Infinity;
    for (let i = 0; i < n; i += 1) {
      for (let s = 0; s < kept; s += 1) {
        const v = p.samples[i * p.channels + s];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
  }
  const scale = hi > lo ? 255 / (hi - lo) : 0;
  const c = canvas(p.outWidth, p.outHeight);
  const ctx = c.getContext("2d");
  const image = ctx.createImageData(p.outWidth, p.outHeight);
  for (let i = 0; i < n; i += 1) {
    for (let rgb = 0; rgb < 3; rgb += 1) {
      const s = kept >= 3 ? rgb : 0;
      image.data[i * 4 + rgb] = (p.samples[i * p.channels + s] - lo) * scale;
    }
    image.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return c;
}

/** The upload on a canvas of the view size, or null when the browser cannot show it, or
 * shows it at another size than the server read (an EXIF-rotated JPEG, say). */
export async function previewCanvas(file, width, height) {
  const step = viewStep(width, height);
  try {
    const head = new Uint8Array(await file.slice(0, 32).arrayBuffer());
    let pixels = null;
    if (isTiff(head)) pixels = await decodeTiff(await file.arrayBuffer(), step);
    else if (pngBitDepth(head) === 16) pixels = await decodePng16(await file.arrayBuffer(), step);
    if (pixels) {
      return pixels.width === width && pixels.height === height ? samplesCanvas(pixels) : null;
    }
    const bitmap = await createImageBitmap(file);
    const same = bitmap.width === width && bitmap.height === height;
    const c = same ? canvas(Math.ceil(width / step), Math.ceil(height / step)) : null;
    if (c) c.getContext("2d").drawImage(bitmap, 0, 0, c.width, c.height);
    bitmap.close();
    return c;
  } catch (error) {
    console.warn(`cannot show ${file.name} in the browser:`, error);
    return null;
  }
}

/** A cell id's colour, as the server's instance overlay gives it (model/instances.py:
 * a golden-ratio walk round the hue circle, full saturation, values 55..255). */
export function cellColour(id) {
  const hue = (id * 0.618033988749895) % 1;
  return [5, 3, 1].map((n) => {
    const k = (n + hue * 6) % 6;
    const rgb = 1 - Math.min(Math.max(Math.min(k, 4 - k), 0), 1);
    return Math.round(55 + 200 * rgb);
  });
}

/** The server's instance labels (16-bit PNG, or 32-bit TIFF beyond 65535 cells) -> the
 * overlay tint with every cell in its own colour, at the view size. */
export async function cellsTint(blob, width, height) {
  const step = viewStep(width, height);
  const buffer = await blob.arrayBuffer();
  const head = new Uint8Array(buffer, 0, Math.min(32, buffer.byteLength));
  const labels = isTiff(head) ? await decodeTiff(buffer, step) : await decodePng16(buffer, step);
  const w = labels.outWidth;
  const h = labels.outHeight;
  const tint = canvas(w, h);
  const data = new ImageData(w, h);
  const colours = new Map();
  for (let i = 0; i < w * h; i += 1) {
    const id = labels.samples[i * labels.channels];
    if (!id) continue;
    if (!colours.has(id)) colours.set(id, cellColour(id));
    data.data.set([...colours.get(id), 255], i * 4);
  }
  tint.getContext("2d").putImageData(data, 0, 0);
  return tint;
}

/** The mask's values at the view size, and how many values each pixel has: the PNG through
 * the browser, or a stack's multi-page TIFF (which the browser cannot read) by our own
 * decoder, its first page (the page shows the first page of a stack, as its preview does). */
async function maskValues(blob, step, w, h) {
  const buffer = await blob.arrayBuffer();
  if (isTiff(new Uint8Array(buffer, 0, Math.min(32, buffer.byteLength)))) {
    const page = await decodeTiff(buffer, step);
    return { values: page.samples, stride: page.channels };
  }
  const resize = step > 1 ? { resizeWidth: w, resizeHeight: h, resizeQuality: "pixelated" } : {};
  const bitmap = await createImageBitmap(blob, {
    colorSpaceConversion: "none",
    premultiplyAlpha: "none",
    ...resize,
  });
  const source = canvas(w, h).getContext("2d", { willReadFrequently: true });
  source.drawImage(bitmap, 0, 0);
  bitmap.close();
  return { values: source.getImageData(0, 0, w, h).data, stride: 4 };
}

/** The mask (PNG, or a stack's TIFF) -> {mask, tint}: the mask to show alone (0/255 for one
 * class, class colours for several) and the classes' colours over transparency, for the
 * overlay. */
export async function maskCanvases(blob, classes, width, height) {
  const step = viewStep(width, height);
  const w = Math.ceil(width / step);
  const h = Math.ceil(height / step);
  const { values, stride } = await maskValues(blob, step, w, h);
  const mask = canvas(w, h);
  const tint = canvas(w, h);
  const maskData = new ImageData(w, h);
  const tintData = new ImageData(w, h);
  for (let i = 0; i < w * h; i += 1) {
    const v = values[i * stride];
    const cls = classes === 1 ? (v ? 1 : 0) : v;
    const colour = cls ? PALETTE[(cls - 1) % PALETTE.length] : [0, 0, 0];
    for (let k = 0; k < 3; k += 1) {
      maskData.data[i * 4 + k] = classes === 1 ? v : colour[k];
      tintData.data[i * 4 + k] = colour[k];
    }
    maskData.data[i * 4 + 3] = 255;
    tintData.data[i * 4 + 3] = cls ? 255 : 0;
  }
  mask.getContext("2d").putImageData(maskData, 0, 0);
  tint.getContext("2d").putImageData(tintData, 0, 0);
  return { mask, tint, step };
}
