// The three views of one result (image, overlay, mask) with one zoom and pan for all three:
// drag, wheel and double-click with a pointer; arrow keys, + - and 0 on a focused view.

const MIN_SCALE = 1 / 64;
const MAX_SCALE = 64;
const ZOOM_STEP = 1.25;
const PAN_STEP = 40;

function copyOf(source) {
  const c = document.createElement("canvas");
  c.width = source.width;
  c.height = source.height;
  c.getContext("2d").drawImage(source, 0, 0);
  return c;
}

export class Viewer {
  constructor(viewports, onZoom) {
    this.viewports = [...viewports];
    this.stages = this.viewports.map((v) => v.querySelector(".stage"));
    this.onZoom = onZoom;
    this.size = null;
    this.step = 1;
    this.opacity = 0.45;
    this.tint = null;
    this.view = { scale: 1, x: 0, y: 0 };
    for (const viewport of this.viewports) this.bind(viewport);
    new ResizeObserver(() => this.size && this.fit()).observe(this.viewports[0]);
  }

  /** Shows {image, mask, tint, step} (canvases of one size, `step` original pixels to one of
   * theirs). With `keepView` (the same image, other colours) the zoom and pan stay. */
  show({ image, mask, tint, step }, keepView = false) {
    const [imageStage, overlayStage, maskStage] = this.stages;
    imageStage.replaceChildren(image);
    overlayStage.replaceChildren(copyOf(image), tint);
    maskStage.replaceChildren(mask);
    tint.classList.add("tint");
    this.tint = tint;
    this.setOpacity(this.opacity);
    this.size = { width: mask.width, height: mask.height };
    this.step = step;
    if (keepView && this.view) this.apply();
    else this.fit();
  }

  setOpacity(opacity) {
    this.opacity = opacity;
    if (this.tint) this.tint.style.opacity = String(opacity);
  }

  centre() {
    const v = this.viewports[0];
    return [v.clientWidth / 2, v.clientHeight / 2];
  }

  fit() {
    if (!this.size) return;
    const v = this.viewports[0];
    const scale = Math.min(v.clientWidth / this.size.width, v.clientHeight / this.size.height);
    this.view = {
      scale,
      x: (v.clientWidth - this.size.width * scale) / 2,
      y: (v.clientHeight - this.size.height * scale) / 2,
    };
    this.apply();
  }

  zoom(factor, cx, cy) {
    if (!this.size) return;
    const { scale, x, y } = this.view;
    const next = Math.min(MAX_SCALE, Math.max(MIN_SCALE, scale * factor));
    const k = next / scale;
    this.view = { scale: next, x: cx - (cx - x) * k, y: cy - (cy - y) * k };
    this.apply();
  }

  pan(dx, dy) {
    if (!this.size) return;
    this.view.x += dx;
    this.view.y += dy;
    this.apply();
  }

  apply() {
    const { scale, x, y } = this.view;
    for (const stage of this.stages) {
      stage.style.transform = `translate(${x}px, ${y}px) scale(${scale})`;
      stage.classList.toggle("pixelated", scale >= 2);
    }
    this.onZoom(scale / this.step);
  }

  bind(viewport) {
    let last = null;
    viewport.addEventListener(
      "wheel",
      (e) => {
        if (!this.size) return;
        e.preventDefault();
        const box = viewport.getBoundingClientRect();
        const factor = e.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP;
        this.zoom(factor, e.clientX - box.left, e.clientY - box.top);
      },
      { passive: false },
    );
    viewport.addEventListener("dblclick", (e) => {
      const box = viewport.getBoundingClientRect();
      this.zoom(2, e.clientX - box.left, e.clientY - box.top);
    });
    viewport.addEventListener("pointerdown", (e) => {
      if (!this.size || e.button !== 0) return;
      viewport.setPointerCapture(e.pointerId);
      last = [e.clientX, e.clientY];
    });
    viewport.addEventListener("pointermove", (e) => {
      if (!last) return;
      this.pan(e.clientX - last[0], e.clientY - last[1]);
      last = [e.clientX, e.clientY];
    });
    const end = () => {
      last = null;
    };
    viewport.addEventListener("pointerup", end);
    viewport.addEventListener("pointercancel", end);
    viewport.addEventListener("keydown", (e) => {
      const keys = {
        ArrowLeft: () => this.pan(PAN_STEP, 0),
        ArrowRight: () => this.pan(-PAN_STEP, 0),
        ArrowUp: () => this.pan(0, PAN_STEP),
        ArrowDown: () => this.pan(0, -PAN_STEP),
        "+": () => this.zoom(ZOOM_STEP, ...this.centre()),
        "=": () => this.zoom(ZOOM_STEP, ...this.centre()),
        "-": () => this.zoom(1 / ZOOM_STEP, ...this.centre()),
        0: () => this.fit(),
      };
      const action = keys[e.key];
      if (action && !e.ctrlKey && !e.metaKey && !e.altKey) {
        e.preventDefault();
        action();
      }
    });
  }
}
