// The tilechain web page: the catalog, a chain editor with drag-and-drop attachments, and a job
// view whose canvases fill in tile by tile, talking to tilechain.v1.Gateway over gRPC-Web with
// the client generated from protos/ (protobuf-es + Connect-ES).

import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { create } from "@bufbuild/protobuf";
import {
  AttachmentSchema,
  ChainRequestSchema,
  Gateway,
  JobState,
  StageEvent_Kind,
  TileReturn,
  type ChainRequest,
  type JobEvent,
  type JobStatus,
} from "../gen/tilechain/v1/gateway_pb";
import type { Artifact, StageSpec } from "../gen/tilechain/v1/stage_pb";
import { renderCatalog, specsByType, paramKind, paramDefault, type Specs } from "./catalog";
import { parseChain, parseStageError, stageName, stageParams, uniqueName, type ChainStageJson, type StageError } from "./chain";
import { byId, formatBytes, frameScheduler, h } from "./dom";
import { FINAL_STATES, forgetJobs, loadJobs, rememberJob, type RecentJob } from "./jobs";
import { TilePainter, newTrace, traceEvent } from "./painter";
import { ProgressView } from "./progress";

// --- the connection ------------------------------------------------------------------------

// The web component passes /tilechain.v1.Gateway/* on to Envoy: same origin, no CORS. ?api=URL
// points the page at another Envoy instead (which must then allow this origin: --cors-origin).
const apiBase = new URLSearchParams(location.search).get("api") ?? location.origin;
const client: Client<typeof Gateway> = createClient(Gateway, createGrpcWebTransport({ baseUrl: apiBase }));

// --- state ---------------------------------------------------------------------------------

interface Attached {
  name: string;
  bytes: Uint8Array;
  url: string;  // an object URL for the thumbnail
}

interface CurrentJob {
  id: string;
  label: string;
  abort: AbortController;
  tiles: number;
  artifacts: Artifact[];
  finished: boolean;
  remembered: boolean;  // in the recent jobs: once the gateway has confirmed the job exists
}

const trace = newTrace();
const painter = new TilePainter(byId("canvases"), trace);
const progressView = new ProgressView(byId("progress"));
let specs: Specs = new Map();
let examples: { name: string; chain: unknown }[] = [];
const attachments = new Map<string, Map<string, Attached>>();  // stage name -> role -> image
let chainError: StageError | null = null;
let current: CurrentJob | null = null;

// what the browser tests read back
(window as unknown as { tilechain: unknown }).tilechain = {
  trace,
  painter,
  get job() {
    return current && { id: current.id, finished: current.finished, tiles: current.tiles };
  },
};

const editor = byId<HTMLTextAreaElement>("chain-json");
const exampleSelect = byId<HTMLSelectElement>("example");
const runButton = byId<HTMLButtonElement>("run");
const submitButton = byId<HTMLButtonElement>("submit");
const cancelButton = byId<HTMLButtonElement>("cancel");

// --- the chain editor ----------------------------------------------------------------------

const renderStages = frameScheduler(() => {
  const parsed = parseChain(editor.value);
  const list = byId("stages");
  const general = byId("chain-error");
  general.textContent = parsed.error ? `Chain: ${parsed.error}` : "";
  if (parsed.error) return;  // keep the last good cards while the text is mid-edit
  let placed = false;
  list.replaceChildren(
    ...parsed.stages.map((stage, index) => {
      const error = chainError && errorMatches(chainError, stage, index) ? chainError : null;
      placed ||= error !== null;
      return stageCard(stage, index, error);
    }),
  );
  if (chainError && !placed) general.textContent = chainError.message;
});

function errorMatches(error: StageError, stage: ChainStageJson, index: number): boolean {
  return error.stage !== undefined ? error.stage === stage.name : error.index === index;
}

function stageCard(stage: ChainStageJson, index: number, error: StageError | null): HTMLElement {
  const name = stageName(stage, index);
  const type = typeof stage.type === "string" ? stage.type : "";
  const spec = specs.get(type);
  const params = stageParams(stage);
  const rows = Object.entries(params).map(([param, value]) => paramRow(param, JSON.stringify(value), spec, error));
  if (error?.param && !(error.param in params)) rows.push(paramRow(error.param, "(not given)", spec, error));
  const roles = spec?.attachments ?? [];
  const card = h(
    "li",
    { class: `stage-card${error ? " has-error" : ""}`, "data-stage": name, "data-index": index },
    h(
      "div",
      { class: "stage-head" },
      h("b", {}, `${index + 1}. ${name}`),
      " ",
      h("code", {}, type || "(no type)"),
      spec?.unavailable ? h("span", { class: "badge unavailable", title: spec.unavailable }, "unavailable") : null,
      specs.size && type && !spec ? h("span", { class: "badge warn" }, "unknown type") : null,
    ),
    rows.length ? h("table", { class: "params" }, h("tbody", {}, ...rows)) : null,
    error && !error.param ? h("p", { class: "error stage-error" }, error.text) : null,
    roles.length ? h("div", { class: "drops" }, ...roles.map((role) => dropZone(name, role, spec!))) : null,
  );
  if (roles.length) {
    // the whole card takes a dropped image, for its first role; a role's own zone takes it for that role
    card.addEventListener("dragover", (event) => {
      event.preventDefault();
      card.classList.add("over");
    });
    card.addEventListener("dragleave", () => card.classList.remove("over"));
    card.addEventListener("drop", (event) => {
      event.preventDefault();
      card.classList.remove("over");
      const file = event.dataTransfer?.files[0];
      if (file) void attach(name, roles[0], file);
    });
  }
  return card;
}

function paramRow(param: string, value: string, spec: StageSpec | undefined, error: StageError | null): HTMLElement {
  const paramSpec = spec?.params.find((p) => p.name === param);
  const wrong = error?.param === param;
  return h(
    "tr",
    { "data-param": param, class: wrong ? "has-error" : "", title: paramSpec ? `${paramKind(paramSpec)}, ${paramDefault(paramSpec)}: ${paramSpec.doc}` : "" },
    h("td", {}, h("code", {}, param)),
    h("td", {}, value, wrong ? h("div", { class: "error param-error" }, error!.text) : null),
  );
}

function dropZone(stage: string, role: string, spec: StageSpec): HTMLElement {
  const attached = attachments.get(stage)?.get(role);
  const input = h("input", { type: "file", accept: "image/*", hidden: true });
  input.addEventListener("change", () => input.files?.[0] && void attach(stage, role, input.files[0]));
  const zone = h(
    "div",
    { class: `drop${attached ? " filled" : ""}`, "data-role": role, title: "drop an image here, or click to choose one" },
    attached ? h("img", { src: attached.url, alt: attached.name }) : null,
    h("span", {}, attached ? `${role}: ${attached.name} (${formatBytes(attached.bytes.length)})` : `${role}${spec.requiredAttachments.includes(role) ? " (required)" : ""}: drop an image`),
    input,
  );
  if (attached) {
    const remove = h("button", { type: "button", class: "small", title: "remove" }, "×");
    remove.addEventListener("click", (event) => {
      event.stopPropagation();
      URL.revokeObjectURL(attached.url);
      attachments.get(stage)?.delete(role);
      renderStages();
    });
    zone.append(remove);
  }
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    event.stopPropagation();
    zone.closest(".stage-card")?.classList.remove("over");
    const file = event.dataTransfer?.files[0];
    if (file) void attach(stage, role, file);
  });
  return zone;
}

async function attach(stage: string, role: string, file: File): Promise<void> {
  if (file.type && !file.type.startsWith("image/")) {
    byId("chain-error").textContent = `${file.name}: not an image (${file.type})`;
    return;
  }
  const bytes = new Uint8Array(await file.arrayBuffer());
  const roles = attachments.get(stage) ?? new Map<string, Attached>();
  const previous = roles.get(role);
  if (previous) URL.revokeObjectURL(previous.url);
  roles.set(role, { name: file.name, bytes, url: URL.createObjectURL(file) });
  attachments.set(stage, roles);
  renderStages();
}

function setChainText(text: string): void {
  editor.value = text;
  chainError = null;
  renderStages();
}

editor.addEventListener("input", () => {
  chainError = null;
  exampleSelect.value = "";
  renderStages();
});

exampleSelect.addEventListener("change", () => {
  const example = examples.find((e) => e.name === exampleSelect.value);
  if (example) setChainText(JSON.stringify(example.chain, null, 2));
});

function addStage(spec: StageSpec): void {
  const parsed = parseChain(editor.value || '{"stages": []}');
  if (parsed.error) {
    byId("chain-error").textContent = `Chain: ${parsed.error} (fix it before adding stages)`;
    return;
  }
  parsed.stages.push({ name: uniqueName(parsed.stages, spec.type), type: spec.type, params: {} });
  setChainText(JSON.stringify({ stages: parsed.stages }, null, 2));
  exampleSelect.value = "";
}

// --- running and watching jobs -------------------------------------------------------------

function chainRequest(stages: ChainStageJson[]): ChainRequest {
  const names = new Set(stages.map((s) => s.name));
  return create(ChainRequestSchema, {
    chainJson: editor.value,
    attachments: [...attachments.entries()]
      .filter(([stage]) => names.has(stage))  // images of stages since renamed or removed stay behind
      .flatMap(([stage, roles]) => [...roles.entries()].map(([role, a]) => create(AttachmentSchema, { stage, role, data: a.bytes }))),
    returnTiles: Number(byId<HTMLSelectElement>("return-tiles").value) as TileReturn,
    transportTile: Number(byId<HTMLInputElement>("transport-tile").value) || 0,
    decodeBetweenStages: byId<HTMLInputElement>("decode-between").checked,
  });
}

function chainLabel(stages: ChainStageJson[]): string {
  if (exampleSelect.value) return exampleSelect.value;
  const types = stages.map((s) => String(s.type));
  return types.length > 4 ? `${types.slice(0, 3).join(" → ")} → … (${types.length} stages)` : types.join(" → ");
}

function beginJob(label: string, stages: { name: string; type: string }[], strip: boolean): CurrentJob {
  current?.abort.abort();
  painter.clear(strip);
  progressView.clear();
  progressView.expect(stages);
  byId("notices").replaceChildren();
  byId("artifacts").replaceChildren();
  showState("STARTING", "");
  byId("job-id").textContent = "";
  current = { id: "", label, abort: new AbortController(), tiles: 0, artifacts: [], finished: false, remembered: false };
  setBusy(true);
  return current;
}

function setBusy(busy: boolean): void {
  runButton.disabled = submitButton.disabled = busy;
  cancelButton.disabled = !busy;
}

function showState(state: string, message: string): void {
  const badge = byId("job-state");
  badge.textContent = state;
  badge.dataset.state = state;
  byId("job-message").textContent = message;
}

function showJobId(job: CurrentJob, id: string): void {
  job.id = id;
  byId("job-id").textContent = id;
  history.replaceState(null, "", `#job=${id}`);
}

/** The gateway knows the job (its first event, or SubmitChain's answer): a recent job now. */
function jobConfirmed(job: CurrentJob, id: string): void {
  if (job.remembered) return;
  if (!job.id) showJobId(job, id);
  job.remembered = true;
  rememberJob({ id, label: job.label, state: "RUNNING" });
  renderJobs();
  traceEvent(trace, "job", id);
}

function handleEvent(job: CurrentJob, event: JobEvent): void {
  if (event.jobId) jobConfirmed(job, event.jobId);
  const kind = event.kind;
  switch (kind.case) {
    case "stage": {
      const s = kind.value;
      if (s.kind === StageEvent_Kind.STARTED) progressView.started(s.stageIndex, s.name, s.type);
      else if (s.kind === StageEvent_Kind.FINISHED) progressView.finished(s.stageIndex, s.name, s.type);
      if (["STARTING", "QUEUED"].includes(byId("job-state").textContent ?? "")) showState("RUNNING", "");
      break;
    }
    case "progress": {
      const p = kind.value;
      if (p.progress) progressView.progress(p.stageIndex, p.name, p.progress.unit, p.progress.done, p.progress.total);
      if (!trace.events.some((e) => e.kind === "progress" && e.job === job.id)) traceEvent(trace, "progress", job.id);
      break;
    }
    case "tile": {
      const t = kind.value;
      if (t.canvas && t.tile) {
        job.tiles++;
        painter.add(t.stageIndex, t.name, t.canvas, t.tile);
      }
      break;
    }
    case "artifact":
      addArtifact(job, kind.value);
      break;
    case "notice": {
      const n = kind.value;
      progressView.notice(n.stageIndex, n.name);
      byId("notices").append(h("li", { "data-stage": n.stageIndex }, h("b", {}, n.name), ": ", n.message));
      break;
    }
    case "status":
      // the final status ends the job; a status that is not final (a queued job, say) is news
      if (FINAL_JOB_STATES.has(kind.value.state)) finishJob(job, kind.value);
      else showState(JobState[kind.value.state], kind.value.message);
      break;
  }
}

const FINAL_JOB_STATES = new Set([JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]);

/** Where the web component serves a file persist-disk wrote (a path below the output root). */
function outputsUrl(path: string): string {
  return `/outputs/${path.split("/").map(encodeURIComponent).join("/")}`;
}

function addArtifact(job: CurrentJob, artifact: Artifact): void {
  if (job.artifacts.some((a) => a.uri === artifact.uri)) return;
  job.artifacts.push(artifact);
  const size = `${artifact.width}×${artifact.height} ${artifact.format}, ${formatBytes(Number(artifact.sizeBytes))}`;
  const item = artifact.uri.startsWith("file://") && artifact.path
    ? h("a", { href: outputsUrl(artifact.path), download: artifact.path.split("/").pop() }, artifact.path)
    : h("code", {}, artifact.uri);
  byId("artifacts").append(h("li", { "data-stage": artifact.stage }, h("b", {}, artifact.stage), ": ", item, ` (${size})`));
}

function finishJob(job: CurrentJob, status: JobStatus): void {
  const state = JobState[status.state];
  traceEvent(trace, "final", job.id || status.jobId, state);
  job.finished = true;
  for (const artifact of status.artifacts) addArtifact(job, artifact);
  showState(state, status.state === JobState.SUCCEEDED ? `${status.stagesDone}/${status.stagesTotal} stages` : status.message);
  rememberJob({ id: status.jobId || job.id, state, message: status.message });
  renderJobs();
  if (status.state === JobState.FAILED) showChainError(status.message);
  // a job reopened after it ran has no tiles to replay: show what it saved instead
  if (job.tiles === 0) {
    for (const a of job.artifacts) if (a.path && a.uri.startsWith("file://")) painter.showImage(outputsUrl(a.path), `${a.stage}: ${a.path}`);
  }
  if (current === job) setBusy(false);
}

function showChainError(message: string): void {
  chainError = parseStageError(message);
  renderStages();
}

function failed(job: CurrentJob, error: unknown): void {
  if (job.abort.signal.aborted && current !== job) return;  // replaced by another job
  const e = ConnectError.from(error);
  job.finished = true;
  traceEvent(trace, "final", job.id, e.code === Code.Canceled ? "CANCELLED" : "FAILED");
  showState(e.code === Code.Canceled ? "CANCELLED" : job.id ? "FAILED" : "REFUSED", `${Code[e.code]}: ${e.rawMessage}`);
  if (job.remembered) {
    rememberJob({ id: job.id, state: e.code === Code.NotFound ? "UNKNOWN" : "FAILED", message: e.rawMessage });
    renderJobs();
  }
  if (e.code === Code.InvalidArgument || e.code === Code.Unimplemented || e.code === Code.FailedPrecondition) showChainError(e.rawMessage);
  if (current === job) setBusy(false);
}

const SLICE_MS = 8;  // handling events for longer than this gives the page a turn (input, frames)

function yieldToPage(): Promise<void> {
  const scheduler = (globalThis as { scheduler?: { yield?: () => Promise<void> } }).scheduler;
  return scheduler?.yield ? scheduler.yield() : new Promise((resolve) => setTimeout(resolve, 0));
}

async function consume(job: CurrentJob, events: AsyncIterable<JobEvent>): Promise<void> {
  try {
    // messages already received are handed over in one chain of microtasks, which nothing else
    // can interrupt: break it up
    let slice = performance.now();
    for await (const event of events) {
      handleEvent(job, event);
      if (performance.now() - slice > SLICE_MS) {
        await yieldToPage();
        slice = performance.now();
      }
    }
    if (!job.finished) failed(job, new ConnectError("the stream ended without a final status", Code.Unavailable));
  } catch (error) {
    failed(job, error);
  }
}

function startChain(mode: "run" | "submit"): void {
  const parsed = parseChain(editor.value);
  if (parsed.error) {
    byId("chain-error").textContent = `Chain: ${parsed.error}`;
    return;
  }
  chainError = null;
  renderStages();
  const request = chainRequest(parsed.stages);
  const stages = parsed.stages.map((s, i) => ({ name: stageName(s, i), type: String(s.type ?? "") }));
  const job = beginJob(chainLabel(parsed.stages), stages, request.returnTiles === TileReturn.ALL);
  if (mode === "run") {
    void consume(job, client.runChain(request, { signal: job.abort.signal }));
    return;
  }
  client.submitChain(request, { signal: job.abort.signal }).then(
    (ref) => {
      jobConfirmed(job, ref.jobId);
      void consume(job, client.watchJob({ jobId: ref.jobId }, { signal: job.abort.signal }));
    },
    (error) => failed(job, error),
  );
}

function openJob(id: string): void {
  id = id.trim();
  if (!id) return;
  const known = loadJobs().find((j) => j.id === id);
  const job = beginJob(known?.label ?? id, [], false);
  showJobId(job, id);
  void consume(job, client.watchJob({ jobId: id }, { signal: job.abort.signal }));
}

async function cancelJob(): Promise<void> {
  const job = current;
  if (!job || job.finished) return;
  if (!job.id) {
    job.abort.abort();  // no job id yet: dropping the call cancels it at the gateway
    return;
  }
  cancelButton.disabled = true;
  showState("CANCELLING", "");
  try {
    await client.cancelJob({ jobId: job.id });  // the stream then ends with the CANCELLED status
  } catch (error) {
    failed(job, error);
  }
}

runButton.addEventListener("click", () => startChain("run"));
submitButton.addEventListener("click", () => startChain("submit"));
cancelButton.addEventListener("click", () => void cancelJob());
byId<HTMLFormElement>("open-job").addEventListener("submit", (event) => {
  event.preventDefault();
  openJob(byId<HTMLInputElement>("job-input").value);
});

// --- recent jobs ---------------------------------------------------------------------------

function renderJobs(): void {
  byId("recent").replaceChildren(...loadJobs().map(jobItem));
}

function jobItem(job: RecentJob): HTMLElement {
  const open = h("button", { type: "button", class: "link" }, job.id);
  open.addEventListener("click", () => openJob(job.id));
  return h(
    "li",
    { "data-job": job.id },
    open,
    " ",
    h("span", { class: "badge", "data-state": job.state }, job.state),
    h("div", { class: "muted" }, job.label, " · ", new Date(job.started).toLocaleString()),
  );
}

async function refreshJobs(all: boolean): Promise<void> {
  const jobs = loadJobs().filter((j) => all || !FINAL_STATES.has(j.state));
  await Promise.all(
    jobs.map(async (job) => {
      try {
        const status = await client.getJob({ jobId: job.id });
        rememberJob({ id: job.id, state: JobState[status.state], message: status.message });
      } catch (error) {
        if (ConnectError.from(error).code === Code.NotFound) rememberJob({ id: job.id, state: "UNKNOWN" });
      }
    }),
  );
  renderJobs();
}

byId("refresh-jobs").addEventListener("click", () => void refreshJobs(true));
byId("forget-jobs").addEventListener("click", () => {
  forgetJobs();
  renderJobs();
});
setInterval(() => {
  if (!document.hidden && loadJobs().some((j) => !FINAL_STATES.has(j.state) && j.id !== current?.id)) void refreshJobs(false);
}, 5000);

// --- start-up ------------------------------------------------------------------------------

async function loadCatalog(): Promise<void> {
  const status = byId("connection");
  try {
    const reply = await client.listStages({});
    specs = specsByType(reply.catalogs);
    renderCatalog(byId("catalog"), reply.catalogs, addStage);
    const unavailable = [...specs.values()].filter((s) => s.unavailable).length;
    status.textContent = `gateway: ${reply.catalogs.length} families, ${specs.size} stages${unavailable ? ` (${unavailable} unavailable here)` : ""}`;
    status.dataset.state = "ok";
    renderStages();
  } catch (error) {
    status.textContent = `cannot reach the gateway at ${apiBase}: ${ConnectError.from(error).message}`;
    status.dataset.state = "error";
  }
}

async function loadExamples(): Promise<void> {
  try {
    const reply = await fetch("/examples.json");
    examples = reply.ok ? (await reply.json()).examples : [];
  } catch {
    examples = [];
  }
  exampleSelect.replaceChildren(h("option", { value: "" }, "(edited)"), ...examples.map((e) => h("option", { value: e.name }, e.name)));
  const wanted = new URLSearchParams(location.search).get("example") ?? "noise-upscale";
  const example = examples.find((e) => e.name === wanted) ?? examples[0];
  if (example && !editor.value.trim()) {
    exampleSelect.value = example.name;
    setChainText(JSON.stringify(example.chain, null, 2));
  }
}

byId("catalog-filter").addEventListener("input", (event) => {
  const text = (event.target as HTMLInputElement).value.toLowerCase();
  for (const entry of document.querySelectorAll<HTMLElement>(".catalog-stage")) {
    entry.hidden = !!text && !entry.textContent?.toLowerCase().includes(text);
  }
});

renderJobs();
void refreshJobs(true);
void Promise.all([loadCatalog(), loadExamples()]).then(() => {
  const hash = /^#job=([\w-]+)$/.exec(location.hash);
  if (hash) openJob(hash[1]);
  document.body.dataset.ready = "true";  // the browser tests wait for this
});
