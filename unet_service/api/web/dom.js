// A small element builder: el("p", {className: "x"}, "text", child, ...).

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** A <dl> of [term, description] pairs. */
export function facts(pairs) {
  const list = el("dl", { className: "facts" });
  for (const [term, description] of pairs) list.append(el("dt", {}, term), el("dd", {}, description));
  return list;
}

/** A file's name without its extension. */
export function stem(name) {
  return name.replace(/\.[^.]*$/, "") || "image";
}

export function percent(part, whole) {
  return `${Math.round((100 * part) / whole)}%`;
}

/** Saves `blob` as a download named `filename`. */
export function saveBlob(blob, filename) {
  const link = el("a", { href: URL.createObjectURL(blob), download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}
