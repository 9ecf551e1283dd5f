// The stage catalog (ListStages): every family's stages, their params with types, ranges and
// help, and whether this deployment can run them.

import { toJson } from "@bufbuild/protobuf";
import { ValueSchema, type Value } from "@bufbuild/protobuf/wkt";
import { ParamType, TileOrder, type ParamSpec, type StageCatalog, type StageSpec } from "../gen/tilechain/v1/stage_pb";
import { h } from "./dom";

export type Specs = Map<string, StageSpec>;

export function specsByType(catalogs: StageCatalog[]): Specs {
  return new Map(catalogs.flatMap((c) => c.stages.map((s) => [s.type, s] as const)));
}

export function valueText(value: Value | undefined): string {
  if (!value || value.kind.case === undefined || value.kind.case === "nullValue") return "";
  return JSON.stringify(toJson(ValueSchema, value));
}

const TYPE_NAMES: Record<ParamType, string> = {
  [ParamType.UNSPECIFIED]: "any",
  [ParamType.INT]: "int",
  [ParamType.FLOAT]: "float",
  [ParamType.BOOL]: "bool",
  [ParamType.STRING]: "str",
  [ParamType.LIST]: "list",
  [ParamType.OBJECT]: "dict",
};

/** "int or 'auto', 64..4096" — the param's type and what it accepts. */
export function paramKind(param: ParamSpec): string {
  let kind = TYPE_NAMES[param.type] ?? "any";
  if (param.choices.length) kind = param.choices.map(valueText).join(" | ");
  if (param.keywords.length) kind += " or " + param.keywords.map((k) => `'${k}'`).join(", ");
  if (param.minimum !== undefined || param.maximum !== undefined) kind += `, ${param.minimum ?? ""}..${param.maximum ?? ""}`;
  return kind;
}

export function paramDefault(param: ParamSpec): string {
  return param.required ? "required" : `default ${valueText(param.default) || "—"}`;
}

export function tiling(spec: StageSpec): string {
  if (spec.needsWholeCanvas || spec.maxTile === 0) return "whole canvas";
  if (spec.streams) return "tile by tile, as they arrive";
  const order = spec.order === TileOrder.SPIRAL ? "spiral" : "grid";
  return `${spec.maxTile} px tiles, overlap ${spec.overlap}, ${order}`;
}

/** The catalog as a list of <details>, one per stage; onAdd appends the stage to the chain. */
export function renderCatalog(container: HTMLElement, catalogs: StageCatalog[], onAdd: (spec: StageSpec) => void): void {
  container.replaceChildren(
    ...catalogs.map((catalog) =>
      h(
        "section",
        { class: "family", "data-family": catalog.family },
        h("h3", {}, catalog.family, " ", h("span", { class: "muted" }, `${catalog.stages.length} stages`)),
        ...catalog.stages.map((spec) => stageEntry(spec, onAdd)),
      ),
    ),
  );
}

function stageEntry(spec: StageSpec, onAdd: (spec: StageSpec) => void): HTMLElement {
  const add = h("button", { type: "button", class: "small", title: "append this stage to the chain" }, "add");
  add.addEventListener("click", (event) => {
    event.preventDefault();
    onAdd(spec);
  });
  const attachments = spec.attachments.map((role) => (spec.requiredAttachments.includes(role) ? `${role} (required)` : role));
  return h(
    "details",
    { class: `catalog-stage${spec.unavailable ? " unavailable" : ""}`, "data-type": spec.type },
    h(
      "summary",
      {},
      h("code", {}, spec.type),
      spec.unavailable ? h("span", { class: "badge unavailable", title: spec.unavailable }, "unavailable") : null,
      " ",
      add,
    ),
    h("p", {}, spec.doc),
    spec.unavailable ? h("p", { class: "unavailable-reason" }, `Unavailable here: ${spec.unavailable}`) : null,
    h(
      "p",
      { class: "muted" },
      tiling(spec),
      attachments.length ? ` · attach: ${attachments.join(", ")}` : "",
      spec.makesLatents || spec.takesLatents ? ` · latents ${[spec.makesLatents && "out", spec.takesLatents && "in"].filter(Boolean).join(" and ")}` : "",
    ),
    spec.params.length
      ? h(
          "table",
          { class: "params" },
          h("thead", {}, h("tr", {}, h("th", {}, "param"), h("th", {}, "type"), h("th", {}, "default"), h("th", {}, "help"))),
          h(
            "tbody",
            {},
            ...spec.params.map((p) =>
              h("tr", { "data-param": p.name }, h("td", {}, h("code", {}, p.name)), h("td", {}, paramKind(p)), h("td", {}, paramDefault(p)), h("td", {}, p.doc)),
            ),
          ),
        )
      : h("p", { class: "muted" }, "no params"),
  );
}
