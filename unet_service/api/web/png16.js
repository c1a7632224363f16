// 16-bit PNGs, read in the browser: browsers show them reduced to 8 bits without stretching,
// which leaves narrow-range microscopy data black. Non-interlaced only (else it throws).

import { inflate } from "./tiff.js";

const CHANNELS = { 0: 1, 2: 3, 4: 2, 6: 4 };

/** The PNG's bit depth, or 0 when the bytes are not a PNG. */
export function pngBitDepth(head) {
  const signature = [137, 80, 78, 71, 13, 10, 26, 10];
  if (head.length < 25 || signature.some((b, i) => head[i] !== b)) return 0;
  return head[24];
}

function paeth(a, b, c) {
  const p = a + b - c;
  const pa = Math.abs(p - a);
  const pb = Math.abs(p - b);
  const pc = Math.abs(p - c);
  if (pa <= pb && pa <= pc) return a;
  return pb <= pc ? b : c;
}

function unfilter(data, height, rowBytes, bpp) {
  const out = new Uint8Array(height * rowBytes);
  for (let y = 0; y < height; y += 1) {
    const type = data[y * (rowBytes + 1)];
    const src = y * (rowBytes + 1) + 1;
    const row = y * rowBytes;
    const up = row - rowBytes;
    for (let i = 0; i < rowBytes; i += 1) {
      const a = i >= bpp ? out[row + i - bpp] : 0;
      const b = y > 0 ? out[up + i] : 0;
      let predicted = 0;
      if (type === 1) predicted = a;
      else if (type === 2) predicted = b;
      else if (type === 3) predicted = (a + b) >> 1;
      else if (type === 4) predicted = paeth(a, b, i >= bpp && y > 0 ? out[up + i - bpp] : 0);
      else if (type !== 0) throw new Error(`PNG filter ${type}`);
      out[row + i] = data[src + i] + predicted;
    }
  }
  return out;
}

/** {width, height, outWidth, outHeight, channels, samples: Float32Array, eightBit: false}. */
export async function decodePng16(buffer, step = 1) {
  const view = new DataView(buffer);
  const bytes = new Uint8Array(buffer);
  const idat = [];
  let width = 0; let height = 0; let channels = 0;
  for (let pos = 8; pos + 8 <= bytes.length;) {
    const length = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    if (type === "IHDR") {
      width = view.getUint32(pos + 8);
      height = view.getUint32(pos + 12);
      channels = CHANNELS[data[9]];
      if (data[8] !== 16 || !channels || data[12] !== 0) throw new Error("not a plain 16-bit PNG");
    } else if (type === "IDAT") {
      idat.push(data);
    } else if (type === "IEND") {
      break;
    }
    pos += 12 + length;
  }
  const rowBytes = width * channels * 2;
  const raw = unfilter(await inflate(new Blob(idat)), height, rowBytes, channels * 2);
  const pixels = new DataView(raw.buffer);
  const outWidth = Math.ceil(width / step);
  const outHeight = Math.ceil(height / step);
  const samples = new Float32Array(outWidth * outHeight * channels);
  for (let y = 0; y < height; y += step) {
    for (let x = 0; x < width; x += step) {
      const out = ((y / step) * outWidth + x / step) * channels;
      for (let s = 0; s < channels; s += 1) {
        samples[out + s] = pixels.getUint16(y * rowBytes + (x * channels + s) * 2);
      }
    }
  }
  return { width, height, outWidth, outHeight, channels, samples, eightBit: false };
}
