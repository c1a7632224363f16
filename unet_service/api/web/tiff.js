// The first page of a TIFF, read in the browser (which cannot show TIFF) so that an upload
// can be displayed beside its mask: 8/16/32-bit integer or 32/64-bit float samples, strips or
// tiles, chunky or planar, uncompressed, LZW, Deflate or PackBits, with or without the
// horizontal predictor. Every `step`-th pixel is kept (1: all), for huge images.
// Anything else throws, and the page says it cannot show the image (the server still reads it).

const TYPE_SIZE = { 1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8 };
const T = {
  width: 256, height: 257, bits: 258, compression: 259, photometric: 262, stripOffsets: 273,
  samples: 277, rowsPerStrip: 278, stripCounts: 279, planar: 284, predictor: 317,
  tileWidth: 322, tileHeight: 323, tileOffsets: 324, tileCounts: 325, format: 339,
};
const NEEDED = new Set(Object.values(T));

function value(view, type, at, le) {
  switch (type) {
    case 1: case 2: case 7: return view.getUint8(at);
    case 6: return view.getInt8(at);
    case 3: return view.getUint16(at, le);
    case 8: return view.getInt16(at, le);
    case 4: case 13: return view.getUint32(at, le);
    case 9: return view.getInt32(at, le);
    case 11: return view.getFloat32(at, le);
    case 12: return view.getFloat64(at, le);
    case 5: return view.getUint32(at, le) / view.getUint32(at + 4, le);
    case 10: return view.getInt32(at, le) / view.getInt32(at + 4, le);
    case 17: return Number(view.getBigInt64(at, le));
    default: return Number(view.getBigUint64(at, le)); // 16, 18
  }
}

function firstIfd(view) {
  const order = view.getUint16(0, false);
  if (order !== 0x4949 && order !== 0x4d4d) throw new Error("not a TIFF");
  const le = order === 0x4949;
  const big = view.getUint16(2, le) === 43;
  const offset = (at) => (big ? Number(view.getBigUint64(at, le)) : view.getUint32(at, le));
  let pos = offset(big ? 8 : 4);
  const count = big ? Number(view.getBigUint64(pos, le)) : view.getUint16(pos, le);
  pos += big ? 8 : 2;
  const tags = new Map();
  for (let i = 0; i < count; i += 1, pos += big ? 20 : 12) {
    const tag = view.getUint16(pos, le);
    const type = view.getUint16(pos + 2, le);
    const n = big ? Number(view.getBigUint64(pos + 4, le)) : view.getUint32(pos + 4, le);
    const size = TYPE_SIZE[type];
    if (!size || !NEEDED.has(tag)) continue;
    const field = pos + (big ? 12 : 8);
    const at = n * size <= (big ? 8 : 4) ? field : offset(field);
    const values = new Array(n);
    for (let k = 0; k < n; k += 1) values[k] = value(view, type, at + k * size, le);
    tags.set(tag, values);
  }
  return { tags, le };
}

function lzw(input, expected) {
  const out = new Uint8Array(expected);
  const prefix = new Int32Array(4096);
  const suffix = new Uint8Array(4096);
  const first = new Uint8Array(4096);
  const length = new Int32Array(4096);
  for (let i = 0; i < 256; i += 1) {
    prefix[i] = -1; suffix[i] = i; first[i] = i; length[i] = 1;
  }
  let o = 0; let next = 258; let width = 9; let old = -1; let bit = 0;
  const write = (code) => {
    const n = length[code];
    let c = code;
    for (let k = n - 1; k >= 0; k -= 1) {
      if (o + k < expected) out[o + k] = suffix[c];
      c = prefix[c];
    }
    o += n;
  };
  const total = input.length * 8;
  while (bit + width <= total && o < expected) {
    let code = 0;
    for (let k = 0; k < width; k += 1, bit += 1) {
      code = (code << 1) | ((input[bit >> 3] >> (7 - (bit & 7))) & 1);
    }
    if (code === 257) break;
    if (code === 256) {
      next = 258; width = 9; old = -1;
      continue;
    }
    if (old === -1) {
      write(code);
      old = code;
      continue;
    }
    if (code > next) throw new Error("corrupt LZW data");
    const known = code < next;
    if (next < 4096) {
      prefix[next] = old;
      suffix[next] = known ? first[code] : first[old];
      first[next] = first[old];
      length[next] = length[old] + 1;
      next += 1;
    }
    write(code);
    if (next === (1 << width) - 1 && width < 12) width += 1; // TIFF's early change
    old = code;
  }
  return out;
}

function packbits(input, expected) {
  const out = new Uint8Array(expected);
  let i = 0; let o = 0;
  while (i < input.length && o < expected) {
    const n = input[i]; i += 1;
    if (n < 128) {
      out.set(input.subarray(i, i + n + 1).subarray(0, expected - o), o);
      i += n + 1; o += n + 1;
    } else if (n > 128) {
      out.fill(input[i], o, Math.min(expected, o + 257 - n));
      i += 1; o += 257 - n;
    }
  }
  return out;
}

export async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function decompress(raw, compression, expected) {
  if (compression === 1) return raw;
  if (compression === 5) return lzw(raw, expected);
  if (compression === 8 || compression === 32946) return inflate(raw);
  if (compression === 32773) return packbits(raw, expected);
  throw new Error(`TIFF compression ${compression} cannot be shown in the browser`);
}

function reader(format, bits, le) {
  const name = { 1: "Uint", 2: "Int", 3: "Float" }[format] + bits;
  const get = DataView.prototype[`get${name}`];
  if (!get) throw new Error(`TIFF samples ${name} cannot be shown`);
  return (view, at) => get.call(view, at, le);
}

function undoPredictor(view, rows, rowSamples, samples, bytes, le) {
  const name = `Uint${bytes * 8}`;
  const get = DataView.prototype[`get${name}`];
  const set = DataView.prototype[`set${name}`];
  for (let r = 0; r < rows; r += 1) {
    const row = r * rowSamples * bytes;
    for (let i = samples; i < rowSamples; i += 1) {
      const at = row + i * bytes;
      const sum = get.call(view, at, le) + get.call(view, at - samples * bytes, le);
      set.call(view, at, sum, le);
    }
  }
}

/** {width, height, outWidth, outHeight, channels, samples: Float32Array, eightBit}. */
export async function decodeTiff(buffer, step = 1) {
  const view = new DataView(buffer);
  const { tags, le } = firstIfd(view);
  const get = (tag, fallback) => (tags.has(tag) ? tags.get(tag) : fallback);
  const width = get(T.width)[0];
  const height = get(T.height)[0];
  const channels = get(T.samples, [1])[0];
  const bits = get(T.bits, [1])[0];
  const format = get(T.format, [1])[0];
  const compression = get(T.compression, [1])[0];
  const predictor = get(T.predictor, [1])[0];
  const planar = get(T.planar, [1])[0] === 2;
  if (predictor !== 1 && (predictor !== 2 || format === 3)) {
    throw new Error(`TIFF predictor ${predictor} cannot be shown in the browser`);
  }
  const read = reader(format, bits, le);
  const bytes = bits / 8;
  const tiled = tags.has(T.tileWidth);
  const chunkW = tiled ? get(T.tileWidth)[0] : width;
  const chunkH = tiled ? get(T.tileHeight)[0] : Math.min(get(T.rowsPerStrip, [height])[0], height);
  const offsets = get(tiled ? T.tileOffsets : T.stripOffsets);
  const counts = get(tiled ? T.tileCounts : T.stripCounts);
  const across = Math.ceil(width / chunkW);
  const perPlane = across * Math.ceil(height / chunkH);
  const perPixel = planar ? 1 : channels;
  const outWidth = Math.ceil(width / step);
  const outHeight = Math.ceil(height / step);
  const samples = new Float32Array(outWidth * outHeight * channels);
  for (let i = 0; i < offsets.length; i += 1) {
    const plane = planar ? Math.floor(i / perPlane) : 0;
    const j = i % perPlane;
    const x0 = (j % across) * chunkW;
    const y0 = Math.floor(j / across) * chunkH;
    const rows = tiled ? chunkH : Math.min(chunkH, height - y0);
    const rowSamples = chunkW * perPixel;
    const raw = new Uint8Array(buffer, offsets[i], counts[i]);
    const data = await decompress(raw, compression, rows * rowSamples * bytes);
    const chunk = new DataView(data.buffer, data.byteOffset, data.byteLength);
    if (predictor === 2) undoPredictor(chunk, rows, rowSamples, perPixel, bytes, le);
    for (let r = 0; r < rows; r += 1) {
      const y = y0 + r;
      if (y >= height || y % step) continue;
      for (let c = 0; c < chunkW; c += 1) {
        const x = x0 + c;
        if (x >= width || x % step) continue;
        const out = ((y / step) * outWidth + x / step) * channels + plane;
        const at = (r * rowSamples + c * perPixel) * bytes;
        for (let s = 0; s < perPixel; s += 1) samples[out + s] = read(chunk, at + s * bytes);
      }
    }
  }
  return { width, height, outWidth, outHeight, channels, samples, eightBit: bits === 8 && format === 1 };
}
