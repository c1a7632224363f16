// Canvases for the three views, every pixel rendered by the server (POST /v1/preview): the
// upload as the overlay shows it, and the tint of the mask's classes or of the cells in the
// overlay's colours. The page decodes no image format itself: the browser reads the PNGs.
// Huge images come back scaled down (VIEW_SIDE on their longer side, the same size for every
// view); the downloads are always the server's full-size answers. A stack shows page 1.

import { preview } from "./api.js";

// Longest side of the views, pixels: images up to this size are shown whole.
export const VIEW_SIDE = 4096;

function canvas(width, height) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  return c;
}

/** A PNG of the server on a canvas, with its values as they are (no colour management). */
async function canvasOf(png) {
  const bitmap = await createImageBitmap(png, {
    colorSpaceConversion: "none",
    premultiplyAlpha: "none",
  });
  const c = canvas(bitmap.width, bitmap.height);
  c.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  return c;
}

/** The upload's first page as the server shows it: 8-bit as is, 16-bit and float stretched
 * from their minimum to their maximum, as in the overlay (`model`: the one it is sent to). */
export async function imageCanvas(file, model) {
  return canvasOf(await preview(file, { maxSide: VIEW_SIDE, model }));
}

/** The overlay's tint from an answer of `model` (its first page): `colour` "classes" for a
 * mask, each class above 0 in its colour; "instances" for cell instances, each cell in its
 * own colour; transparent elsewhere. */
export async function tintCanvas(answer, colour, model) {
  return canvasOf(await preview(answer, { maxSide: VIEW_SIDE, colour, model, name: colour }));
}

/** The mask alone, from its tint: white on black for one class, each class in its colour
 * on black for several. */
export function maskCanvas(tint, oneClass) {
  const mask = canvas(tint.width, tint.height);
  const ctx = mask.getContext("2d");
  ctx.drawImage(tint, 0, 0);
  if (oneClass) {
    ctx.globalCompositeOperation = "source-in"; // white wherever the tint is
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, mask.width, mask.height);
  }
  ctx.globalCompositeOperation = "destination-over"; // black behind
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, mask.width, mask.height);
  return mask;
}
