// Per-stage progress of the job on show: started/finished, and a bar per unit ("tiles",
// "steps", "images") with its rate and an estimate of the time left. Events update the model;
// the rows are redrawn at most once per animation frame.

import { frameScheduler, formatSeconds, h } from "./dom";

interface Unit {
  done: number;
  total: number;
  firstTime: number;  // when the first progress of this unit came, and how far it was then
  firstDone: number;
  lastTime: number;
}

interface StageRow {
  index: number;
  name: string;
  type: string;
  state: "waiting" | "running" | "done";
  units: Map<string, Unit>;
  notices: number;
}

export class ProgressView {
  private stages: StageRow[] = [];
  readonly schedule: () => void;

  constructor(private container: HTMLElement) {
    this.schedule = frameScheduler(() => this.render());
  }

  clear(): void {
    this.stages = [];
    this.schedule();
  }

  private row(index: number, name: string, type = ""): StageRow {
    while (this.stages.length <= index) {
      this.stages.push({ index: this.stages.length, name: "", type: "", state: "waiting", units: new Map(), notices: 0 });
    }
    const row = this.stages[index];
    if (name) row.name = name;
    if (type) row.type = type;
    return row;
  }

  /** Rows for a chain about to run, so that every stage shows before it starts. */
  expect(stages: { name: string; type: string }[]): void {
    stages.forEach((s, i) => this.row(i, s.name, s.type));
    this.schedule();
  }

  started(index: number, name: string, type: string): void {
    this.row(index, name, type).state = "running";
    this.schedule();
  }

  finished(index: number, name: string, type: string): void {
    const row = this.row(index, name, type);
    row.state = "done";
    for (const unit of row.units.values()) unit.done = Math.max(unit.done, unit.total);
    this.schedule();
  }

  progress(index: number, name: string, unit: string, done: number, total: number): void {
    const row = this.row(index, name);
    if (row.state === "waiting") row.state = "running";
    const now = performance.now();
    const known = row.units.get(unit);
    if (!known) row.units.set(unit, { done, total, firstTime: now, firstDone: done, lastTime: now });
    else Object.assign(known, { done, total, lastTime: now });
    this.schedule();
  }

  notice(index: number, name: string): void {
    this.row(index, name).notices++;
    this.schedule();
  }

  private render(): void {
    // updated in place: replacing the rows every frame would lay the page out anew each time
    const items = this.container.children;
    while (items.length > this.stages.length) items[items.length - 1].remove();
    this.stages.forEach((row, i) => {
      let item = items[i] as HTMLElement | undefined;
      if (!item) {
        item = h("li", { class: "stage-progress", "data-stage": i }, h("span", { class: "stage-label" }), h("span", { class: "stage-state" }));
        this.container.append(item);
      }
      const label = `${row.index + 1}. ${row.name || "?"}\u0000${row.type}`;
      if (item.dataset.label !== label) {
        item.dataset.label = label;
        item.children[0].replaceChildren(h("b", {}, `${row.index + 1}. ${row.name || "?"}`), " ", h("code", {}, row.type));
      }
      if (item.dataset.state !== row.state) {
        item.dataset.state = row.state;
        item.className = `stage-progress ${row.state}`;
        item.children[1].textContent = row.state;
      }
      for (const [name, unit] of row.units) updateUnit(item, name, unit);
    });
  }
}

function updateUnit(item: HTMLElement, name: string, unit: Unit): void {
  let element = item.querySelector<HTMLElement>(`.unit[data-unit="${name}"]`);
  if (!element) {
    element = h("span", { class: "unit", "data-unit": name }, h("progress", {}), h("span", { class: "unit-text" }));
    item.append(element);
  }
  const seconds = (unit.lastTime - unit.firstTime) / 1000;
  const rate = seconds > 0 ? (unit.done - unit.firstDone) / seconds : 0;
  let detail = `${unit.done}/${unit.total} ${name}`;
  if (rate > 0) {
    detail += ` · ${rate.toFixed(rate < 10 ? 1 : 0)} ${name}/s`;
    if (unit.done < unit.total) detail += ` · ${formatSeconds((unit.total - unit.done) / rate)} left`;
  }
  element.dataset.done = String(unit.done);
  element.dataset.total = String(unit.total);
  const bar = element.children[0] as HTMLProgressElement;
  bar.max = Math.max(1, unit.total);
  bar.value = unit.done;
  if (element.children[1].textContent !== detail) element.children[1].textContent = detail;
}
