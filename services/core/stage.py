"""The stage base class and the registry that maps type names to stage classes.

A stage declares what it is (type, family, params, tiling) and implements the work on one
processing tile (`process_tile`) or, when it needs global context, on whole canvases
(`process_canvas`). Everything about streaming lives in the engine, not here."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import grpc
import numpy as np

from tilechain.v1 import stage_pb2, tiles_pb2

from .config import FAMILIES, Settings
from .models import ModelRegistry
from .params import Param, ParamError, dict_to_struct, struct_to_dict, validate_params
from .tiles import Rect, plan_windows

Canvas = tiles_pb2.Canvas
IMAGE = tiles_pb2.CANVAS_ROLE_IMAGE
MASK = tiles_pb2.CANVAS_ROLE_MASK
CONTROL = tiles_pb2.CANVAS_ROLE_CONTROL
RGB8, RGBA8, L8 = tiles_pb2.PIXEL_FORMAT_RGB8, tiles_pb2.PIXEL_FORMAT_RGBA8, tiles_pb2.PIXEL_FORMAT_L8
ROLE_NAMES = {"image": IMAGE, "mask": MASK, "control": CONTROL}
KEEP_ROWS, KEEP_CANVAS = "rows", "canvas"  # what a stage keeps of an output (Stage.keeps)

# Service-wide counters that stage code bumps where the engine cannot see the work (images
# through a VAE); the Stats RPC reports them.
SERVICE_COUNTERS: Counter[str] = Counter()


def stage_label(name: str, stage_type: str) -> str:
    return f"stage '{name}' ({stage_type})"


class StageError(Exception):
    """A failure with the gRPC status it should surface as."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Cancelled(Exception):
    """Raised inside stage code when the caller went away."""


@dataclass
class OutputPlan:
    """One output canvas and the input canvases it is computed from, by the names the stage
    uses for them ("image", "other", "mask", ...)."""

    canvas: Canvas
    sources: dict[str, Canvas] = field(default_factory=dict)


@dataclass
class TileWork:
    """One processing tile: the output window and, per source, the input pixels it needs."""

    output: Canvas
    window: Rect                                            # in output canvas coordinates
    inputs: dict[str, tuple[Canvas, Rect, np.ndarray]]     # name -> (source, rect in it, pixels)

    def source(self, name: str = "image") -> Canvas:
        return self.inputs[name][0]

    def rect(self, name: str = "image") -> Rect:
        return self.inputs[name][1]

    def pixels(self, name: str = "image") -> np.ndarray:
        return self.inputs[name][2]


@dataclass
class Context:
    """What a running stage may use besides its inputs."""

    job_id: str
    settings: Settings
    models: ModelRegistry | None = None
    attempt: int = 1  # the job's run (StageStart.attempt): 2 or more when the gateway runs it again
    cancel_event: threading.Event = field(default_factory=threading.Event)
    notices: list[str] = field(default_factory=list)
    # set by the engine while a processing tile runs: stage code reports (done, total) of its
    # own finer unit (denoising steps), from its worker thread
    on_step: Callable[[int, int], None] | None = None

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()


class Stage:
    type: ClassVar[str]
    family: ClassVar[str]
    doc: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    max_tile: ClassVar[int] = 512          # processing tile edge in output pixels; 0 = whole canvas
    overlap: ClassVar[int] = 0             # output pixels shared by neighbouring processing tiles
    order: ClassVar[str] = "grid"          # or "spiral"
    # the result does not depend on where the processing tiles are cut (a resize, a per-pixel
    # or halo-exact filter): the engine may cut them, and the output's rows, to line up with
    # the input's rows (engine.output_grid), which keeps less input waiting
    exact_tiles: ClassVar[bool] = False
    needs_whole_canvas: bool = False      # a class default; a stage may decide per request (source-noise)
    attachments: ClassVar[tuple[str, ...]] = ()           # roles a caller may attach: "image", "mask", "control"
    required_attachments: ClassVar[tuple[str, ...]] = ()
    size_params: ClassVar[tuple[str, ...]] = ()           # params that set the output size
    streams: ClassVar[bool] = False         # takes its input tiles one by one (stream_open/stream_tile) instead of processing tiles
    makes_latents: ClassVar[bool] = False   # can emit its images as latents (see emits_latent)
    takes_latents: ClassVar[bool] = False   # can start from latents instead of pixels (accepts_latent)
    # Python modules the stage's work imports (lazily): a slim install without the `models`
    # extra still serves the family's other stages and lists this one as unavailable.
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, values: Mapping[str, Any], context: Context, latent_output: bool = False) -> None:
        self.name = name
        self.p = dict(values)
        self.context = context
        self.latent_output = latent_output  # emit latent canvases (the gateway asked; see emits_latent)

    @property
    def label(self) -> str:
        return stage_label(self.name, self.type)

    # --- description ---------------------------------------------------------------------

    @classmethod
    def preload(cls, models: ModelRegistry, name: str) -> bool:
        """Load model `name` as a request of this stage would (same cache), if this stage takes
        it; called at service start-up for the models in the preload list. True if it loaded
        (or had loaded) it; False if the stage does not take such a model."""
        return False

    @classmethod
    def unavailable(cls) -> str:
        """Why this install cannot run the stage ("" when it can): the modules it lacks."""
        missing = [module for module in cls.requires if not module_installed(module)]
        if not missing:
            return ""
        return f"not installed here: {', '.join(missing)} (the tilechain[models] extra)"

    @classmethod
    def create(cls, name: str, raw_params: Mapping[str, Any], context: Context, latent_output: bool = False) -> Stage:
        return cls(name, validate_params(cls.params, raw_params), context, latent_output)

    @classmethod
    def spec(cls) -> stage_pb2.StageSpec:
        return stage_pb2.StageSpec(
            type=cls.type,
            family=cls.family,
            doc=cls.doc,
            params=[p.to_proto() for p in cls.params],
            max_tile=cls.max_tile,
            overlap=cls.overlap,
            needs_whole_canvas=cls.needs_whole_canvas,
            order=stage_pb2.TILE_ORDER_SPIRAL if cls.order == "spiral" else stage_pb2.TILE_ORDER_GRID,
            attachments=list(cls.attachments),
            required_attachments=list(cls.required_attachments),
            makes_latents=cls.makes_latents,
            takes_latents=cls.takes_latents,
            unavailable=cls.unavailable(),
            requires=list(cls.requires),
            streams=cls.streams,
        )

    # --- planning ------------------------------------------------------------------------

    def plan(self, inputs: list[Canvas]) -> list[OutputPlan]:
        """The output canvases for these inputs. By default: one output per chain image, of the
        size and format that output_canvas gives, computed from that image."""
        outputs = []
        for image in self.chain_images(inputs):
            outputs.append(OutputPlan(self.output_canvas(image), {"image": image}))
        return outputs

    def output_canvas(self, image: Canvas) -> Canvas:
        return self.derived(image, image.width, image.height)

    def derived(self, source: Canvas, width: int, height: int, pixel_format: int | None = None) -> Canvas:
        """A canvas made from source: its role and index, this stage added to its provenance."""
        canvas = Canvas(
            width=width,
            height=height,
            format=pixel_format or source.format,
            role=source.role,
            index=source.index,
        )
        canvas.provenance.CopyFrom(self.provenance(source))
        return canvas

    def provenance(self, source: Canvas | None = None) -> Any:
        """The source's provenance with this stage appended to its stages; other top-level keys
        (a note, the chain's prompt: edit-metadata, text-prompt) carry on unchanged."""
        data = struct_to_dict(source.provenance) if source is not None else {}
        data["stages"] = data.get("stages", []) + [{"name": self.name, "type": self.type, "params": self.p}]
        return dict_to_struct(data)

    @staticmethod
    def carried(inputs: list[Canvas], key: str) -> str:
        """A top-level provenance value the chain's canvases carry ("prompt", written by
        text-prompt or edit-metadata), "" if none does."""
        for canvas in inputs:
            value = canvas.provenance.fields.get(key)
            if value is not None and value.string_value:
                return value.string_value
        return ""

    def adopt_chain_prompt(self, inputs: list[Canvas]) -> None:
        """An empty prompt (or negative prompt) param takes the one the chain's images carry, as
        onnx-web's stages read the job's prompt; the provenance then records the prompt used."""
        for key in ("prompt", "negative_prompt"):
            if key in self.p and not self.p[key]:
                self.p[key] = self.carried(inputs, key)

    @staticmethod
    def chain_images(inputs: list[Canvas]) -> list[Canvas]:
        return [c for c in inputs if c.role == IMAGE and not c.attached]

    @staticmethod
    def attached(inputs: list[Canvas], role: int) -> Canvas | None:
        return next((c for c in inputs if c.attached and c.role == role), None)

    def mask(self, inputs: list[Canvas]) -> Canvas:
        """The attached mask, else a mask from the previous stage; ParamError if neither."""
        mask = self.attached(inputs, MASK) or next((c for c in inputs if c.role == MASK), None)
        if mask is None:
            raise ParamError("mask", "needs a mask: attach one to this stage or produce one in the previous stage")
        return mask

    @staticmethod
    def require_same_size(param: str, what: str, canvas: Canvas, image: Canvas) -> None:
        if (canvas.width, canvas.height) != (image.width, image.height):
            raise ParamError(
                param,
                f"{what} is {canvas.width}x{canvas.height} but the image is {image.width}x{image.height}",
            )

    # --- latent handoff (diffusion stages on one VAE; see docs/diffusion.md) ---------------

    def emits_latent(self, outputs: list[OutputPlan]) -> str:
        """The latent space these outputs could be emitted in instead of pixels, "" = none."""
        return ""

    def accepts_latent(self, outputs: list[OutputPlan]) -> str:
        """The latent space whose latents the stage would take in place of its chain images, "" = none."""
        return ""

    # --- tiling --------------------------------------------------------------------------

    def tile_size(self) -> int:
        return 0 if self.needs_whole_canvas else self.max_tile

    def windows(self, output: Canvas, overlap: int, row_shift: int = 0) -> list[Rect]:
        """The processing tiles of an output canvas, in the order they should run; row_shift:
        the output's transport rows are shifted up by it (tiles.Rows), as they should be."""
        return plan_windows(output.width, output.height, self.tile_size(), overlap, self.order, row_shift)

    def input_rect(self, window: Rect, name: str, source: Canvas, output: Canvas) -> Rect:
        """The rect of source that the output window is computed from, including any context
        (halo) the operator reads around it; the engine clamps it to the source."""
        return window

    # --- work ----------------------------------------------------------------------------

    def process_tile(self, work: TileWork) -> np.ndarray:
        """Output pixels (window.height, window.width, channels), uint8."""
        raise NotImplementedError

    def jobs_with_steps(self, jobs: int) -> int:
        """How many of the stage's processing tiles report steps (for the progress total)."""
        return jobs

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        """Whole-canvas stages: the output canvas from whole source canvases."""
        raise NotImplementedError

    def keeps(self, output: OutputPlan) -> str:
        """What the stage keeps of an output's tiles as they are sent (persist writes its
        images): "" nothing (the default); KEEP_ROWS: its rows, given to write_rows() top to
        bottom in bands as soon as each band is complete, then finish(output, None); KEEP_CANVAS:
        the whole canvas, given to finish() once complete. The engine assembles and holds what
        it has not yet given (docs/design.md, "Engine memory")."""
        return ""

    def write_rows(self, output: OutputPlan, y: int, pixels: np.ndarray) -> None:
        """KEEP_ROWS outputs: the next complete rows, y to y + len(pixels), (rows, width,
        channels), in order. In a worker thread."""
        raise NotImplementedError

    def finish(self, output: OutputPlan, pixels: np.ndarray | None) -> list[stage_pb2.Artifact]:
        """Kept outputs, once every tile has been sent: the whole canvas (KEEP_CANVAS), or None
        (KEEP_ROWS: after the last write_rows). In a worker thread."""
        return []

    def discard(self, output: OutputPlan) -> None:
        """Kept outputs that will not be finished (the stream failed or was cancelled): let go
        of what write_rows began (an open file, an upload). In a worker thread, maybe while a
        write_rows of the same output still runs in another."""

    # --- the job's end (the Finish RPC) and the service's start ----------------------------

    @classmethod
    def finish_job(cls, settings: Settings, job_id: str, attempt: int, commit: bool) -> list[stage_pb2.Artifact]:
        """Publish (commit) or discard what the stage staged for a job; the artifacts published.
        Called once per job by the Finish RPC, in a worker thread."""
        return []

    @classmethod
    def start_up(cls, settings: Settings) -> None:
        """Called once when a service starts (e.g. to clean what a dead predecessor left)."""

    # --- streaming stages ---------------------------------------------------------------------

    def stream_open(self, output: OutputPlan) -> Any:
        """Streaming stages: the state of one output, before any tile."""
        raise NotImplementedError

    def stream_tile(self, state: Any, output: OutputPlan, name: str, rect: Rect, pixels: np.ndarray) -> list[tuple[Rect, np.ndarray]]:
        """Streaming stages: take one input tile of source `name` (in any partition and
        order); return the output regions it finished, each (rect, pixels), never overlapping."""
        raise NotImplementedError

    def stream_held_bytes(self, state: Any) -> int:
        """Streaming stages: the bytes of input the state holds (for ServiceStats)."""
        return 0


class PassThroughStage(Stage):
    """A stage each of whose outputs is its input image unchanged (source-image, edit-metadata,
    the persist stages): its tiles stream straight through as they arrive, in whatever order,
    so it holds no input and adds no wait. Its plan maps each output to one source, "image"."""

    streams = True

    def stream_open(self, output: OutputPlan) -> None:
        return None

    def stream_tile(self, state: None, output: OutputPlan, name: str, rect: Rect, pixels: np.ndarray) -> list[tuple[Rect, np.ndarray]]:
        return [(rect, pixels)]


@functools.cache
def module_installed(module: str) -> bool:
    """Whether a top-level module can be imported, without importing it (torch alone takes
    seconds and hundreds of MiB)."""
    return importlib.util.find_spec(module) is not None


STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    if cls.type in STAGES:
        raise ValueError(f"stage type {cls.type!r} registered twice")
    if cls.family not in FAMILIES:
        raise ValueError(f"stage {cls.type!r}: unknown family {cls.family!r}")
    STAGES[cls.type] = cls
    return cls


def load_family(family: str) -> dict[str, type[Stage]]:
    """Import a family's stage module (registering its stages) and return its stages."""
    importlib.import_module(f"tilechain.services.{family}")
    return {name: cls for name, cls in STAGES.items() if cls.family == family}


def load_all() -> dict[str, type[Stage]]:
    for family in FAMILIES:
        load_family(family)
    return dict(STAGES)
