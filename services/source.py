"""Source stages: make new images (noise, an attached image, a diffusion model). A source stage replaces the
chain's images with its own; it reads an input image only where its params say so."""

from __future__ import annotations

import secrets
import time
from typing import Any

import grpc
import numpy as np

from .core.codecs import ImageDecodeError, decode_image, encoded_header, match_channels
from .core.controlnet import control_call, control_images, control_params
from .core.diffusion import DiffusionStage, count_param, generator, prompt_params, sampling_params
from .core.params import Param, ParamError
from .core.resample import resize
from .core.stage import CONTROL, IMAGE, RGB8, RGBA8, OutputPlan, PassThroughStage, Stage, StageError, TileWork, register
from .core.tiles import Rect
from tilechain.v1 import tiles_pb2


@register
class SourceNoise(Stage):
    """Uniform noise is made per processing tile, gaussian noise per band of rows in order,
    each exactly the pixels the whole-canvas draw `noise()` gives for the seed (see
    uniform_window); histogram noise reads its sample image whole, so it works on whole
    canvases."""

    type = "source-noise"
    family = "source"
    doc = (
        "Fill new images with noise: uniform, gaussian, or colours drawn from an input image's "
        "histogram (the chain's image, or one attached), as onnx-web fills outpainting borders. "
        "Uniform and gaussian noise are made tile by tile; histogram reads its input image whole."
    )
    params = (
        Param("width", int, 512, "Width of each image in pixels.", min=8, max=65536),
        Param("height", int, 512, "Height of each image in pixels.", min=8, max=65536),
        Param("method", str, "uniform", "Noise distribution.", choices=("uniform", "gaussian", "histogram")),
        Param("seed", int, -1, "Random seed; -1 picks one (recorded in the provenance). Image i uses seed + i.", min=-1, max=2**32 - 1),
        Param("count", int, 1, "Number of images.", min=1, max=16),
    )
    attachments = ("image",)
    size_params = ("width", "height")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.p["seed"] == -1:
            self.p["seed"] = secrets.randbelow(2**32 - 16)
        self.needs_whole_canvas = self.p["method"] == "histogram"
        self._gaussian: dict[int, tuple[np.random.Generator, int]] = {}  # image index -> (generator, next row)

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        sample = self.attached(inputs, IMAGE) or next(iter(self.chain_images(inputs)), None)
        if self.p["method"] == "histogram" and sample is None:
            raise ParamError("method", "'histogram' needs an input image: place the stage after one or attach one")
        outputs = []
        for index in range(self.p["count"]):
            canvas = tiles_pb2.Canvas(width=self.p["width"], height=self.p["height"], format=RGB8, role=IMAGE, index=index)
            canvas.provenance.CopyFrom(self.provenance())
            sources = {"image": sample} if self.p["method"] == "histogram" else {}
            outputs.append(OutputPlan(canvas, sources))
        return outputs

    def windows(self, output: tiles_pb2.Canvas, overlap: int, row_shift: int = 0) -> list[Rect]:
        if self.p["method"] != "gaussian":
            return super().windows(output, overlap, row_shift)
        # full-width bands, run in order (the engine runs ready tiles by rank): each continues
        # the one generator; ~4 MiB of float64 normals per band
        rows = max(1, GAUSSIAN_BAND_VALUES // (output.width * 3))
        return [Rect(0, y, output.width, min(rows, output.height - y)) for y in range(0, output.height, rows)]

    def process_tile(self, work: TileWork) -> np.ndarray:
        canvas, window = work.output, work.window
        seed = self.p["seed"] + canvas.index
        if self.p["method"] == "uniform":
            return uniform_window(seed, canvas.width, window)
        rng, row = self._gaussian.get(canvas.index) or (np.random.default_rng(seed), 0)
        if window.y != row or window.width != canvas.width:
            raise StageError(grpc.StatusCode.INTERNAL, f"{self.label}: gaussian bands out of order (row {window.y}, expected {row})")
        self._gaussian[canvas.index] = (rng, window.y1)
        return gaussian(rng, window.width, window.height)

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        return noise(self.p["method"], self.p["width"], self.p["height"], self.p["seed"] + output.canvas.index, sources.get("image"))


GAUSSIAN_BAND_VALUES = 1 << 19  # values (x 8 bytes) of normals drawn per gaussian band


def uniform_window(seed: int, width: int, window: Rect) -> np.ndarray:
    """The window's pixels of noise("uniform", width, _, seed), drawn without the rest: numpy
    makes uniform bytes as the little-endian bytes of consecutive 64-bit PCG64 outputs, and
    PCG64 can jump ahead, so each row of the window draws only the outputs under it."""
    generator = np.random.PCG64(seed)
    out = np.empty((window.height, window.width * 3), dtype=np.uint8)
    position = 0  # 64-bit outputs drawn or skipped so far
    last = np.zeros(0, dtype="<u8")  # the last output drawn (a row may start inside it)
    for row in range(window.height):
        start = ((window.y + row) * width + window.x) * 3
        end = start + window.width * 3
        first, stop = start // 8, (end - 1) // 8 + 1
        if first >= position:
            generator.advance(first - position)
            draws = generator.random_raw(stop - first).astype("<u8")
        else:  # shares its first output with the previous row's last
            draws = np.concatenate((last, generator.random_raw(stop - position).astype("<u8")))
        position, last = stop, draws[-1:]
        out[row] = draws.view(np.uint8)[start - first * 8 : end - first * 8]
    return out.reshape(window.height, window.width, 3)


def gaussian(rng: np.random.Generator, width: int, rows: int) -> np.ndarray:
    return np.clip(rng.normal(127.5, 48.0, (rows, width, 3)), 0, 255).astype(np.uint8)


def noise(method: str, width: int, height: int, seed: int, sample: np.ndarray | None = None) -> np.ndarray:
    """A whole canvas of noise (the reference the tiled stage reproduces)."""
    rng = np.random.default_rng(seed)
    if method == "uniform":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if method == "gaussian":
        return gaussian(rng, width, height)
    assert sample is not None
    rgb = sample[:, :, :3] if sample.shape[2] >= 3 else np.repeat(sample, 3, axis=2)
    channels = []
    for c in range(3):
        counts = np.bincount(rgb[:, :, c].ravel(), minlength=256).astype(np.float64)
        channels.append(rng.choice(256, size=(height, width), p=counts / counts.sum()).astype(np.uint8))
    return np.stack(channels, axis=2)


@register
class SourceImage(PassThroughStage):
    type = "source-image"
    family = "source"
    doc = "Start from an image attached to the request under this stage's name."
    attachments = ("image",)
    required_attachments = ("image",)

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        image = self.attached(inputs, IMAGE)
        canvas = tiles_pb2.Canvas(width=image.width, height=image.height, format=image.format, role=IMAGE, index=0)
        canvas.provenance.CopyFrom(self.provenance())
        return [OutputPlan(canvas, {"image": image})]


@register
class SourceTxt2Img(DiffusionStage):
    type = "source-txt2img"
    family = "source"
    doc = (
        "Generate images from a prompt with a diffusion model (SD 1.x/2.x, SDXL, or any "
        "diffusers text-to-image pipeline). The whole image is one pipeline call; for images "
        "far beyond the model's native size, generate at native size and upscale, then refine "
        "with blend-img2img, which tiles. With control, ControlNets guide it: the control image "
        "is attached, or made from the chain's image (resized to width x height) by the preprocessor."
    )
    task = "txt2img"
    makes_latents = True
    params = (
        *prompt_params("sd15"),
        Param("width", int, 512, "Width in pixels, a multiple of 8.", min=64, max=4096),
        Param("height", int, 512, "Height in pixels, a multiple of 8.", min=64, max=4096),
        count_param("Images per request"),
        *sampling_params(),
        *control_params(),
    )
    needs_whole_canvas = True
    max_tile = 0
    attachments = ("control",)
    size_params = ("width", "height")

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        self.adopt_chain_prompt(inputs)
        self.check_model()
        for side in ("width", "height"):
            if self.p[side] % 8:
                raise ParamError(side, f"{self.p[side]} is not a multiple of 8 (the VAE works in 8-pixel blocks)")
        sources = self.control_source(inputs)
        self.images: np.ndarray | None = None
        outputs = []
        for index in range(self.p["count"]):
            canvas = tiles_pb2.Canvas(width=self.p["width"], height=self.p["height"], format=RGB8, role=IMAGE, index=index)
            canvas.provenance.CopyFrom(self.provenance())
            outputs.append(OutputPlan(self.result_canvas(canvas), dict(sources)))
        return outputs

    def control_source(self, inputs: list[tiles_pb2.Canvas]) -> dict[str, tiles_pb2.Canvas]:
        """The picture the control images come from: the attached control image, else the
        chain's (first) image; a source stage reads its input only for this."""
        attached = self.attached(inputs, CONTROL)
        if not self.controls:
            if attached is not None:
                raise ParamError("control", "a control image is attached but the stage has no ControlNet: set control")
            return {}
        picture = attached or next(iter(self.chain_images(inputs)), None)
        if picture is None:
            raise ParamError("control", "needs a control image: attach one (role control) or place the stage after an image")
        return {"control": picture}

    def control_arguments(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> dict:
        if not self.controls:
            return {}
        from .core.codecs import to_pil

        attached = output.sources["control"].attached
        picture = sources["control"][:, :, :3]
        if picture.shape[:2] != (self.p["height"], self.p["width"]):
            picture = resize(picture, self.p["width"], self.p["height"], "lanczos")
        call = control_call(self.controls, control_images(self.context.models, self.controls, picture, attached, self.p), self.p)
        call["control_image"] = [to_pil(image) for image in call["control_image"]]
        return call

    def jobs_with_steps(self, jobs: int) -> int:
        return 1  # one batched call makes every image

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        if self.images is None:  # all `count` images in one batched call, on the first output
            count, seed = self.p["count"], self.p["seed"]
            call = self.prompt_call() | self.control_arguments(output, sources) | {
                "width": self.p["width"],
                "height": self.p["height"],
                "num_images_per_prompt": count,
                "generator": [generator(seed + i) for i in range(count)],
            }
            self.images = self.run_pipeline(call)
        # some pipelines round the size up (Kandinsky: to multiples of 64); keep the asked size
        return self.images[output.canvas.index][: output.canvas.height, : output.canvas.width]


# --- images from elsewhere: S3 objects and URLs -----------------------------------------------

HEADER_READS = (64 * 1024, 1024 * 1024)  # bytes read to find an image's size, then more if needed
# the time planning may spend on reading headers: the gateway gives a stage's Plan 10 s
PLAN_SECONDS = 8.0


class RemoteSource(Stage):
    """Images read from somewhere else, one output per location: the size comes from the
    image's header at planning (checked against the pixel limit before anything is decoded),
    the image is read and decoded when the stage runs."""

    family = "source"
    needs_whole_canvas = True
    max_tile = 0

    def locations(self) -> list[tuple[str, str]]:
        """(param, location) of every image, in order."""
        raise NotImplementedError

    def read(self, param: str, location: str, first_bytes: int = 0) -> bytes:
        """The image's bytes (the first first_bytes only, when given, within plan_left())."""
        raise NotImplementedError

    def plan_left(self) -> float:
        return max(0.1, self.plan_deadline - time.monotonic())

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        self.plan_deadline = time.monotonic() + PLAN_SECONDS
        self.sources: dict[int, tuple[str, str]] = {}
        outputs = []
        for index, (param, location) in enumerate(self.locations()):
            width, height, channels = self.header(param, location)
            canvas = tiles_pb2.Canvas(width=width, height=height, format=RGBA8 if channels == 4 else RGB8, role=IMAGE, index=index)
            canvas.provenance.CopyFrom(self.provenance())
            self.sources[index] = (param, location)
            outputs.append(OutputPlan(canvas, {}))
        return outputs

    def header(self, param: str, location: str) -> tuple[int, int, int]:
        for size in HEADER_READS:
            data = self.read(param, location, size)
            try:
                width, height, channels, _ = encoded_header(data)
                break
            except ImageDecodeError as exc:
                if len(data) < size or size == HEADER_READS[-1]:  # the whole file, or enough of it
                    raise ParamError(param, f"{location}: {exc}") from None
        limit = self.context.settings.max_pixels
        if width * height > limit:
            raise ParamError(param, f"{location} is {width}x{height}, over the limit of {limit} pixels (TILECHAIN_MAX_PIXELS)")
        return width, height, channels

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        canvas = output.canvas
        param, location = self.sources[canvas.index]
        data = self.read(param, location)
        try:
            width, height, _, _ = encoded_header(data)  # checked again: it may have changed since planning
            if (width, height) != (canvas.width, canvas.height):
                raise StageError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self.label}: param '{param}': {location} is {width}x{height} now, {canvas.width}x{canvas.height} when the chain was planned",
                )
            pixels = decode_image(data)
        except ImageDecodeError as exc:
            raise ParamError(param, f"{location}: {exc}") from None
        return match_channels(pixels, 4 if canvas.format == RGBA8 else 3)


def location_params(one: str, many: str, what: str) -> tuple[Param, Param]:
    return (
        Param(one, str, "", f"One {what}."),
        Param(many, list, [], f"Several {what}s, one image each (after {one}, if both are given)."),
    )


def locations_of(stage: Stage, one: str, many: str) -> list[tuple[str, str]]:
    found = ([(one, stage.p[one])] if stage.p[one] else []) + [(many, v) for v in stage.p[many]]
    if not found:
        raise ParamError(many, f"needs {one} or {many}")
    for param, value in found:
        if not isinstance(value, str) or not value:
            raise ParamError(param, f"expected a non-empty string, got {value!r}")
    return found


@register
class SourceS3(RemoteSource):
    type = "source-s3"
    doc = (
        "Read images from an S3 bucket (AWS or an S3-compatible endpoint the service allows), one "
        "per key, with the service's credentials. Objects over TILECHAIN_SOURCE_MAX_BYTES or "
        "images over the pixel limit are refused before they are decoded."
    )
    params = (
        Param("bucket", str, doc="The bucket."),
        *location_params("key", "keys", "object key"),
        Param("endpoint_url", str, "", "The S3 endpoint; '' is the service's (TILECHAIN_S3_ENDPOINT, else AWS); others must be in the service's TILECHAIN_S3_ENDPOINTS."),
        Param("profile_name", str, "", "A profile of the service's AWS config whose credentials to use; '' is boto3's default chain."),
        Param("region", str, "", "The bucket's region; '' is boto3's."),
    )

    def locations(self) -> list[tuple[str, str]]:
        return locations_of(self, "key", "keys")

    def client(self) -> Any:
        from .core import s3

        if not hasattr(self, "_client"):
            self.endpoint = s3.resolve_endpoint(self.context.settings, self.p["endpoint_url"]).describe()
            self._client = s3.client(self.context.settings, self.p["endpoint_url"], self.p["profile_name"], self.p["region"])
        return self._client

    def read(self, param: str, location: str, first_bytes: int = 0) -> bytes:
        from .core import s3

        client, bucket = self.client(), self.p["bucket"]
        where = f"s3://{bucket}/{location}"
        limit = self.context.settings.source_max_bytes
        try:
            head = client.head_object(Bucket=bucket, Key=location)
            size = int(head.get("ContentLength", 0))
            kind = str(head.get("ContentType", "")).split(";", 1)[0].strip().lower()
            if size > limit:
                raise ParamError(param, f"{where} is {size} bytes, over the limit of {limit} (TILECHAIN_SOURCE_MAX_BYTES)")
            if kind and not (kind.startswith("image/") or kind in ("application/octet-stream", "binary/octet-stream")):
                raise ParamError(param, f"{where} is {kind}, not an image")
            ranged = {"Range": f"bytes=0-{first_bytes - 1}"} if first_bytes else {}
            body = client.get_object(Bucket=bucket, Key=location, **ranged)["Body"]
            data = body.read((first_bytes or limit) + 1)
            body.close()
        except (ParamError, StageError):
            raise
        except Exception as exc:
            error = s3.s3_error(self.label, param, where, exc)
            if isinstance(error, ParamError) and "not found" in error.message:
                try:
                    s3.check_bucket(client, bucket, self.label, self.endpoint)
                except ParamError as missing:
                    raise missing from None
                raise ParamError(param, f"there is no object {where} at {self.endpoint}") from None
            raise error from None
        if not first_bytes and len(data) > limit:
            raise ParamError(param, f"{where} is over the limit of {limit} bytes (TILECHAIN_SOURCE_MAX_BYTES)")
        return data[:first_bytes] if first_bytes else data


@register
class SourceUrl(RemoteSource):
    type = "source-url"
    doc = (
        "Read images from http(s) URLs, one per URL. Only public addresses are fetched (no "
        "loopback, private, link-local or metadata addresses, checked at every redirect, unless "
        "the service's TILECHAIN_SOURCE_ALLOW_NETWORKS allows them); the answer must be an image, "
        "within TILECHAIN_SOURCE_MAX_BYTES and TILECHAIN_SOURCE_TIMEOUT, and within the pixel "
        "limit before it is decoded."
    )
    params = location_params("url", "urls", "http or https URL")

    def locations(self) -> list[tuple[str, str]]:
        return locations_of(self, "url", "urls")

    def read(self, param: str, location: str, first_bytes: int = 0) -> bytes:
        from .core.fetch import FetchFailed, FetchRefused, fetch

        settings = self.context.settings
        try:
            return fetch(
                location,
                max_bytes=settings.source_max_bytes,
                timeout=min(settings.source_timeout, self.plan_left()) if first_bytes else settings.source_timeout,
                allow_networks=settings.source_allow_networks,
                first_bytes=first_bytes,
            ).data
        except FetchRefused as exc:
            raise ParamError(param, str(exc)) from None
        except FetchFailed as exc:
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"{self.label}: param '{param}': {exc}") from None
