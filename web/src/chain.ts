// The chain being edited: its JSON text parsed into stages, and the gateway's refusals mapped
// back onto the stage and param they name.

export interface ChainStageJson {
  name?: unknown;
  type?: unknown;
  params?: unknown;
}

export interface ParsedChain {
  stages: ChainStageJson[];
  /** Why the text is not a chain ("" when it is one). */
  error: string;
}

export function parseChain(text: string): ParsedChain {
  let document: unknown;
  try {
    document = JSON.parse(text);
  } catch (exc) {
    return { stages: [], error: `not valid JSON: ${(exc as Error).message}` };
  }
  if (typeof document !== "object" || document === null || !Array.isArray((document as { stages?: unknown }).stages)) {
    return { stages: [], error: 'expected an object with a "stages" list' };
  }
  const stages = (document as { stages: unknown[] }).stages;
  const bad = stages.findIndex((s) => typeof s !== "object" || s === null || Array.isArray(s));
  if (bad >= 0) return { stages: [], error: `stages[${bad}] is not an object` };
  return { stages: stages as ChainStageJson[], error: "" };
}

export function stageName(stage: ChainStageJson, index: number): string {
  return typeof stage.name === "string" && stage.name ? stage.name : `stages[${index}]`;
}

export function stageParams(stage: ChainStageJson): Record<string, unknown> {
  return typeof stage.params === "object" && stage.params !== null && !Array.isArray(stage.params) ? (stage.params as Record<string, unknown>) : {};
}

/** A refusal from the gateway, split into what it names. */
export interface StageError {
  stage?: string;   // the stage's name, from "stage 'NAME' (TYPE): ..."
  index?: number;   // or its position, from "stages[N]: ..." / "chain_json: stages[N]: ..."
  type?: string;
  param?: string;   // from "...: param 'PARAM': ..."
  text: string;     // what is wrong (the rest of the message)
  message: string;  // the whole message
}

const STAGE_MESSAGE = /^stage '(.*?)'(?: \(([^)]*)\))?: (?:param '(.*?)': )?([\s\S]*)$/;
const INDEX_MESSAGE = /^(?:chain_json: )?stages\[(\d+)\]:? ([\s\S]*)$/;

/** The gateway's INVALID_ARGUMENT messages: `stage 'NAME' (TYPE): param 'PARAM': what is wrong`. */
export function parseStageError(message: string): StageError {
  const named = STAGE_MESSAGE.exec(message);
  if (named) return { stage: named[1], type: named[2] || undefined, param: named[3] || undefined, text: named[4], message };
  const indexed = INDEX_MESSAGE.exec(message);
  if (indexed) return { index: Number(indexed[1]), text: indexed[2], message };
  return { text: message, message };
}

/** A name for a new stage of this type, unused in the chain: "upscale-simple" -> "upscale-simple-2". */
export function uniqueName(stages: ChainStageJson[], type: string): string {
  const taken = new Set(stages.map((s) => s.name));
  const base = type.replace(/^[a-z]+-/, "") || type;
  if (!taken.has(base)) return base;
  for (let n = 2; ; n++) if (!taken.has(`${base}-${n}`)) return `${base}-${n}`;
}
