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
