// Painting returned tiles onto canvases as they arrive.
//
// One canvas per (stage, output canvas), created at the canvas's full size on its first tile,
// so memory is bounded by the canvases, not by the number of tiles. A tile is converted to RGBA
// (RGB8 and L8 expand; RGBA8 is copied) and put with putImageData. A tile that arrives while
// nothing is waiting is drawn at once, within a per-frame budget; beyond the budget, tiles wait in
// a queue that requestAnimationFrame drains a budget's worth at a time, so a 4096² image or a
// 16-stage strip never blocks the tab for more than a few milliseconds per frame.
//
// A canvas larger than the page shows it is kept off the page at full size (for saving and
// reading back) and shown through a smaller copy that each tile updates in its own rectangle:
// without a GPU, every frame in which a 4096² canvas on the page changes costs the browser
// ~140 ms to composite (Chromium 156, software rendering); the copy costs a few.

import { PixelFormat, type Canvas, type Tile } from "../gen/tilechain/v1/tiles_pb";
import { h } from "./dom";

const FRAME_BUDGET_MS = 8;  // drawing per frame, leaving the rest of a 16 ms frame to the page
const VIEW_EDGE = 1600;     // longest edge of a canvas shown on the page (the final image)
const STRIP_VIEW_EDGE = 480;  // in the strip of every stage's canvases
const TRACE_LIMIT = 10000;

/** What the page did, in order: read back by the browser tests (window.tilechain.trace). */
export interface Trace {
  seq: number;
  paints: { seq: number; t: number; tiles: number }[];
  events: { seq: number; t: number; kind: string; job: string; state?: string }[];
}

export function newTrace(): Trace {
  return { seq: 0, paints: [], events: [] };
}

export function traceEvent(trace: Trace, kind: string, job: string, state?: string): void {
  if (trace.events.length < TRACE_LIMIT) trace.events.push({ seq: ++trace.seq, t: performance.now(), kind, job, state });
}

interface Surface {
  stageIndex: number;
  canvasId: number;
  full: HTMLCanvasElement;  // the canvas at full size: every tile lands here
  context: CanvasRenderingContext2D;
  view: CanvasRenderingContext2D | null;  // the smaller copy on the page, if full is too large to show
  scale: number;  // view pixels per canvas pixel
  format: PixelFormat;
  caption: HTMLElement;
  label: string;
  tiles: number;
}

interface Pending {
  surface: Surface;
  tile: Tile;
}

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
const CHANNELS: Partial<Record<PixelFormat, number>> = {
  [PixelFormat.RGB8]: 3,
  [PixelFormat.RGBA8]: 4,
  [PixelFormat.L8]: 1,
};

/** The tile's pixels as RGBA ImageData (null if its size does not match its format). */
export function tileImage(format: PixelFormat, tile: Tile): ImageData | null {
  const channels = CHANNELS[format];
  const count = tile.width * tile.height;
  if (!channels || count === 0 || tile.pixels.length !== count * channels) return null;
  const image = new ImageData(tile.width, tile.height);
  const src = tile.pixels;
  if (channels === 4) {
    image.data.set(src);
  } else if (LITTLE_ENDIAN) {
    const out = new Uint32Array(image.data.buffer);  // one write per pixel: ABGR in memory order
    if (channels === 3) {
      for (let i = 0, j = 0; i < count; i++, j += 3) out[i] = 0xff000000 | (src[j + 2] << 16) | (src[j + 1] << 8) | src[j];
    } else {
      for (let i = 0; i < count; i++) {
        const v = src[i];
        out[i] = 0xff000000 | (v << 16) | (v << 8) | v;
      }
    }
  } else {
    const out = image.data;
    for (let i = 0; i < count; i++) {
      const j = i * channels;
      out[4 * i] = src[j];
      out[4 * i + 1] = src[j + (channels === 3 ? 1 : 0)];
      out[4 * i + 2] = src[j + (channels === 3 ? 2 : 0)];
      out[4 * i + 3] = 255;
    }
  }
  return image;
}

export class TilePainter {
  private surfaces = new Map<string, Surface>();
  private queue: Pending[] = [];
  private head = 0;             // queue[head..] still to draw
  private spent = 0;            // ms drawn since the last frame
  private frameRequested = false;
  private strip = false;
  private scratchContext: CanvasRenderingContext2D | null = null;
  tilesDrawn = 0;
  tilesSkipped = 0;

  constructor(private container: HTMLElement, private trace: Trace) {}

  /** Forget every canvas (a new job). */
  clear(strip: boolean): void {
    this.surfaces.clear();
    this.queue = [];
    this.head = 0;
    this.spent = 0;
    this.tilesDrawn = this.tilesSkipped = 0;
    this.container.replaceChildren();
    this.container.classList.toggle("strip", strip);
    this.strip = strip;
  }

  get pending(): number {
    return this.queue.length - this.head;
  }

  add(stageIndex: number, stageName: string, canvas: Canvas, tile: Tile): void {
    const surface = this.surface(stageIndex, stageName, canvas);
    if (!surface) {
      this.tilesSkipped++;
      return;
    }
    this.queue.push({ surface, tile });
    // drawn now if nothing waits and this frame has budget left; a hidden tab gets no frames
    if ((this.pending === 1 && this.spent < FRAME_BUDGET_MS) || document.hidden) this.drain(document.hidden ? Infinity : FRAME_BUDGET_MS);
    if (this.pending > 0) this.requestFrame();
  }

  /** Show a finished image (an artifact, for a job reopened after its tiles went by). */
  showImage(url: string, label: string): void {
    this.container.append(h("figure", {}, h("img", { src: url, alt: label }), h("figcaption", {}, label)));
  }

  /** A canvas at full size as a PNG data URL (the first canvas of the stage without canvasId). */
  imageURL(stageIndex: number, canvasId?: number): string | null {
    for (const s of this.surfaces.values()) {
      if (s.stageIndex === stageIndex && (canvasId === undefined || s.canvasId === canvasId)) return s.full.toDataURL("image/png");
    }
    return null;
  }

  private surface(stageIndex: number, stageName: string, canvas: Canvas): Surface | null {
    const key = `${stageIndex}:${canvas.id}`;
    const known = this.surfaces.get(key);
    if (known) return known;
    // latent canvases are never returned to callers; anything else unknown is skipped too
    if (!CHANNELS[canvas.format] || canvas.width === 0 || canvas.height === 0) return null;
    const full = h("canvas", { width: canvas.width, height: canvas.height });
    const context = full.getContext("2d", { willReadFrequently: false });
    if (!context) return null;
    const edge = this.strip ? STRIP_VIEW_EDGE : VIEW_EDGE;
    const scale = Math.min(1, edge / Math.max(canvas.width, canvas.height));
    const shown = scale < 1 ? h("canvas", { width: Math.max(1, Math.round(canvas.width * scale)), height: Math.max(1, Math.round(canvas.height * scale)) }) : full;
    const view = scale < 1 ? shown.getContext("2d") : null;
    if (view) view.imageSmoothingQuality = "medium";
    Object.assign(shown.dataset, { stage: stageIndex, stageName, canvas: canvas.id, width: canvas.width, height: canvas.height, scale: scale.toFixed(4) });
    const role = canvas.format === PixelFormat.L8 ? "mask" : "image";
    const label = `${stageName} · ${role} ${canvas.index} · ${canvas.width}×${canvas.height}`;
    const caption = h("figcaption", {}, label);
    const save = h("a", { href: "#", class: "save", title: "save this canvas at full size as a PNG" }, "PNG");
    save.addEventListener("click", (event) => {
      event.preventDefault();
      full.toBlob((blob) => {
        if (!blob) return;
        const link = h("a", { href: URL.createObjectURL(blob), download: `${stageName}-${canvas.index}.png` });
        link.click();
        setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
      }, "image/png");
    });
    this.container.append(h("figure", { "data-stage": stageIndex }, shown, h("div", { class: "figline" }, caption, save)));
    const surface = { stageIndex, canvasId: canvas.id, full, context, view, scale, format: canvas.format, caption, label, tiles: 0 };
    this.surfaces.set(key, surface);
    return surface;
  }

  private scratch(): CanvasRenderingContext2D {
    this.scratchContext ??= h("canvas", { width: 512, height: 512 }).getContext("2d")!;
    return this.scratchContext;
  }

  private requestFrame(): void {
    if (this.frameRequested) return;
    this.frameRequested = true;
    requestAnimationFrame(() => {
      this.frameRequested = false;
      this.spent = 0;
      this.drain(FRAME_BUDGET_MS);
      if (this.pending > 0) this.requestFrame();
    });
  }

  private drain(budget: number): void {
    const start = performance.now();
    let drawn = 0;
    const touched = new Set<Surface>();
    while (this.head < this.queue.length && this.spent + (performance.now() - start) < budget) {
      const { surface, tile } = this.queue[this.head];
      this.queue[this.head++] = undefined as unknown as Pending;  // let the tile's bytes go
      const image = tileImage(surface.format, tile);
      if (!image || tile.x + tile.width > surface.full.width || tile.y + tile.height > surface.full.height) {
        this.tilesSkipped++;
        continue;
      }
      surface.context.putImageData(image, tile.x, tile.y);
      if (surface.view) copyToView(surface, tile, image, this.scratch());
      surface.tiles++;
      touched.add(surface);
      drawn++;
    }
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
    }
    this.spent += performance.now() - start;
    if (drawn === 0) return;
    this.tilesDrawn += drawn;
    for (const surface of touched) surface.caption.textContent = `${surface.label} · ${surface.tiles} tiles`;
    if (this.trace.paints.length < TRACE_LIMIT) this.trace.paints.push({ seq: ++this.trace.seq, t: performance.now(), tiles: drawn });
  }
}

/** Draw the tile, scaled, into the smaller copy: through a tile-sized scratch canvas (drawing
 * from the full canvas would snapshot all of it, tens of MB, per tile), onto whole view pixels,
 * rounded the same way on both sides of every tile edge, so that no seams show. */
function copyToView(surface: Surface, tile: Tile, image: ImageData, scratch: CanvasRenderingContext2D): void {
  const { scale, view } = surface;
  if (scratch.canvas.width < tile.width || scratch.canvas.height < tile.height) {
    scratch.canvas.width = Math.max(scratch.canvas.width, tile.width);
    scratch.canvas.height = Math.max(scratch.canvas.height, tile.height);
  }
  scratch.putImageData(image, 0, 0);
  const x0 = Math.round(tile.x * scale), y0 = Math.round(tile.y * scale);
  const x1 = Math.round((tile.x + tile.width) * scale), y1 = Math.round((tile.y + tile.height) * scale);
  if (x1 > x0 && y1 > y0) view!.drawImage(scratch.canvas, 0, 0, tile.width, tile.height, x0, y0, x1 - x0, y1 - y0);
}
