"""onnx-web's chain dialect, in one place: what the params of onnx-web's chains mean in tilechain.

The gateway runs every stage's params through `translate` after parsing the chain and before
checking them against the catalogs. A param the stage takes under its own name stays as it is
(values in onnx-web's other forms converted: numbers and booleans as strings, named tile sizes).
A param onnx-web knows is mapped to its tilechain meaning, or, where tilechain has no
equivalent on that stage, dropped with a notice that names it and says why it has no effect.
A name that neither knows is left for the catalog check to refuse (INVALID_ARGUMENT naming the
stage and the param).

The rules below are also the table in docs/onnx-web.md (`python -m tilechain.gateway.dialect`
writes it; tests/test_dialect.py fails when it is stale)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from tilechain.services.core.params import Param, ParamError
from tilechain.v1 import stage_pb2

# onnx-web's named tile sizes (its SizeChart), in pixels
TILE_SIZES: dict[str, int] = {
    "micro": 64, "mini": 128, "half": 256, "auto": 512,
    "hd1k": 1024, "hd2k": 2048, "hd4k": 4096, "hd8k": 8192, "hd16k": 16384, "hd32k": 32768, "hd64k": 65536,
}

# onnx-web stage types that tilechain does not have (yet): refused with this message
ONNX_WEB_ONLY_STAGES: tuple[str, ...] = ("upscale-dat",)

# which stages the top-level `defaults` fill: onnx-web's txt2img and img2img param sets (the
# diffusion stages that start from an image count as img2img)
DEFAULTS_FOR: dict[str, tuple[str, ...]] = {
    "txt2img": ("source-txt2img",),
    "img2img": ("blend-img2img", "blend-inpaint", "upscale-outpaint", "upscale-stable-diffusion", "upscale-latent"),
}

SPANDREL_UPSCALERS = ("upscale-resrgan", "upscale-spandrel", "upscale-swinir", "upscale-bsrgan")
FIXED_SCALE = {"upscale-stable-diffusion": 4, "upscale-latent": 2}   # diffusion upscalers' own factor
UPSCALE_MODEL_STAGES = (*SPANDREL_UPSCALERS, *FIXED_SCALE)
FACE_STAGES = ("correct-gfpgan", "correct-codeformer")
SD_UPSCALER_MAX_NOISE = 350
TRUE_WORDS, FALSE_WORDS = ("true", "t", "yes", "y", "on", "1"), ("false", "f", "no", "n", "off", "0")
NOISE_METHODS = {"uniform": "uniform", "gaussian": "gaussian", "normal": "gaussian", "histogram": "histogram"}


def tile_size(param: str, value: Any) -> int:
    """An onnx-web tile size: a name from its chart, or a number of pixels."""
    if isinstance(value, str) and value.strip() in TILE_SIZES:
        return TILE_SIZES[value.strip()]
    number = as_number(value)
    if isinstance(number, (int, float)) and not isinstance(number, bool) and float(number).is_integer() and number > 0:
        return int(number)
    names = ", ".join(f"{k} ({v})" for k, v in TILE_SIZES.items())
    raise ParamError(param, f"{value!r} is not a tile size: one of {names}, or a number of pixels")


def as_number(value: Any) -> Any:
    """Numbers as onnx-web takes them, strings included ("512", "0.5"); anything else unchanged."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return value
            return number if math.isfinite(number) else value
    return value


def as_bool(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    return value


def coerce(param: Param, value: Any) -> Any:
    """A value in one of onnx-web's other forms, converted to the param's type where it can be."""
    if isinstance(value, str) and value in param.keywords:
        return value
    if param.type in (int, float):
        return as_number(value)
    if param.type is bool:
        return as_bool(value)
    return value


@dataclass
class StageParams:
    """One stage's params while they are translated."""

    type: str
    known: dict[str, Param]       # the tilechain stage's params
    raw: Mapping[str, Any]        # as the chain gave them
    params: dict[str, Any] = field(default_factory=dict)
    notices: list[tuple[str, str]] = field(default_factory=list)  # (onnx-web param, why it has no effect)

    def set(self, target: str, value: Any, source: str) -> bool:
        """Set a tilechain param from onnx-web's `source`; False when the stage has no such
        param. A param the chain set itself (or set already through another name) wins."""
        if target not in self.known:
            return False
        if target in self.params:
            self.notice(source, f"not used: this stage's '{target}' is given too")
            return True
        self.params[target] = coerce(self.known[target], value)
        return True

    def notice(self, name: str, why: str) -> None:
        self.notices.append((name, why))

    def given(self, *names: str) -> bool:
        return any(name in self.raw for name in names)


Apply = Callable[[StageParams, str, Any], None]


@dataclass(frozen=True)
class Rule:
    family: str              # the group of onnx-web params (docs, tests)
    names: tuple[str, ...]   # onnx-web's spellings
    meaning: str             # what it is in tilechain, and where it has no effect (docs)
    apply: Apply
    order: int = 0           # applied after lower orders (overlap needs the tile)
    # where the stage has a param of the same name, the rule still takes the values that do not
    # fit its type (a boolean `upscale`, a fractional `overlap`); otherwise those are refused
    other_forms: bool = False


# --- the ways a param maps ------------------------------------------------------------------


def same(target: str | None = None, absent: str = "") -> Apply:
    """onnx-web's param is tilechain's `target` (its own name by default) where the stage has
    it; elsewhere a notice."""

    def apply(stage: StageParams, name: str, value: Any) -> None:
        if not stage.set(target or name, value, name):
            stage.notice(name, absent or f"{stage.type} has no '{target or name}'; it has no effect here")

    return apply


def only(why: str) -> Apply:
    """No tilechain equivalent: a notice that says why."""

    def apply(stage: StageParams, name: str, value: Any) -> None:
        stage.notice(name, why)

    return apply


def tiles(stage: StageParams, name: str, value: Any) -> None:
    size = tile_size(name, value)
    tile = stage.known.get("tile")
    if tile is None:
        stage.notice(name, f"{stage.type} streams its images in transport tiles and picks its own processing tiles; a tile size has no effect here")
    elif isinstance(value, str) and value.strip() == "auto" and "auto" in tile.keywords:
        stage.set("tile", "auto", name)
    elif tile.max is not None and size > tile.max:
        stage.set("tile", int(tile.max), name)
        stage.notice(name, f"{value!r} ({size} px) is above {stage.type}'s largest tile, {int(tile.max)} px, which is used instead")
    elif tile.min is not None and size < tile.min:
        stage.set("tile", int(tile.min), name)
        stage.notice(name, f"{value!r} ({size} px) is below {stage.type}'s smallest tile, {int(tile.min)} px, which is used instead")
    else:
        stage.set("tile", size, name)


def overlap(stage: StageParams, name: str, value: Any) -> None:
    """onnx-web gives overlap as a fraction of the tile (0.25); tilechain in pixels."""
    number = as_number(value)
    if "overlap" not in stage.known:
        stage.notice(name, f"{stage.type} has no overlap; it has no effect here")
        return
    if not isinstance(number, (int, float)) or isinstance(number, bool) or number < 0:
        raise ParamError(name, f"expected a fraction of the tile (0..1) or pixels, got {value!r}")
    if number >= 1:
        stage.set("overlap", int(number), name)
        return
    tile = stage.params.get("tile")
    if isinstance(tile, int):
        stage.set("overlap", round(number * tile), name)
    else:
        stage.notice(name, f"a fraction ({number}) of the tile needs a tile in pixels (tiles or unet_tile); the stage's own overlap is used")


def batch(stage: StageParams, name: str, value: Any) -> None:
    if not stage.set("count", value, name):
        stage.notice(name, f"{stage.type} makes one image per input; batches are made by the stages that generate (count)")


def scale(stage: StageParams, name: str, value: Any) -> None:
    """onnx-web's `scale` is the upscaling model's own factor, `outscale` the final one."""
    number = as_number(value)
    if stage.type in SPANDREL_UPSCALERS:
        if stage.given("outscale"):
            stage.notice(name, "the model's own factor is read from the model; outscale sets the final scale")
        else:
            stage.set("outscale", number, name)
    elif stage.type in FIXED_SCALE:
        fixed_factor(stage, name, number)
    elif name == "outscale" and stage.type == "upscale-simple":
        if not stage.given("scale"):
            stage.set("scale", number, name)
        else:
            stage.notice(name, "upscale-simple enlarges by scale, which is given")
    else:
        stage.notice(name, f"{stage.type} does not enlarge by a factor; it has no effect here")


def fixed_factor(stage: StageParams, name: str, number: Any) -> None:
    factor = FIXED_SCALE[stage.type]
    if number != factor:
        stage.notice(name, f"{stage.type} always enlarges x{factor}; for another size add upscale-simple or reduce-thumbnail after it")


def upscale(stage: StageParams, name: str, value: Any) -> None:
    """onnx-web's `upscale`: its on/off switch for the upscaling step (a boolean), or, in its
    example pipelines, the upscaling model's name."""
    flag = as_bool(value)
    if isinstance(flag, bool):
        stage.notice(name, "onnx-web's switch for its upscaling step; in a chain a stage runs because it is in the chain")
    elif stage.type in UPSCALE_MODEL_STAGES:
        stage.set("model", value, name)
    else:
        stage.notice(name, f"{stage.type} runs no upscaling model; it has no effect here")


def upscaling(stage: StageParams, name: str, value: Any) -> None:
    if stage.type in UPSCALE_MODEL_STAGES:
        stage.set("model", value, name)
    else:
        stage.notice(name, f"{stage.type} runs no upscaling model; upscaling runs in upscale-* stages")


def correction(stage: StageParams, name: str, value: Any) -> None:
    if stage.type in FACE_STAGES:
        stage.set("model", value, name)
    else:
        stage.notice(name, "faces are restored by correct-gfpgan and correct-codeformer stages; it has no effect here")


def face_strength(stage: StageParams, name: str, value: Any) -> None:
    # GFPGAN's weight is how much of the restored face shows; CodeFormer's is its fidelity weight
    target = {"correct-gfpgan": "strength", "correct-codeformer": "fidelity"}.get(stage.type)
    if target is None or not stage.set(target, value, name):
        stage.notice(name, "faces are restored by correct-gfpgan and correct-codeformer stages; it has no effect here")


def face_outscale(stage: StageParams, name: str, value: Any) -> None:
    if stage.type not in FACE_STAGES or not stage.set("upscale", value, name):
        stage.notice(name, "faces are restored (and enlarged) by correct-* stages; it has no effect here")


def denoise(stage: StageParams, name: str, value: Any) -> None:
    number = as_number(value)
    if stage.type == "upscale-stable-diffusion" and isinstance(number, (int, float)) and not isinstance(number, bool):
        # onnx-web's slider runs 0..1; the x4 upscaler's noise level 0..350
        level = round(number * SD_UPSCALER_MAX_NOISE) if number <= 1 else number
        stage.set("noise_level", level, name)
    elif stage.type in SPANDREL_UPSCALERS:
        stage.notice(name, "tilechain runs the upscaling model as it is (no blend with a denoising variant)")
    else:
        stage.notice(name, f"{stage.type} has no denoise; it has no effect here")


def colour_fill(stage: StageParams, name: str, value: Any) -> None:
    if "colour" not in stage.known:
        stage.notice(name, f"{stage.type} fills nothing; it has no effect here")
        return
    from PIL import ImageColor

    try:
        red, green, blue = ImageColor.getrgb(str(value))[:3]
    except ValueError:
        raise ParamError(name, f"{value!r} is not a colour (a name like 'white' or '#rrggbb')") from None
    stage.set("fill", "colour", name)
    stage.set("colour", f"#{red:02x}{green:02x}{blue:02x}", name)


def noise_source(stage: StageParams, name: str, value: Any) -> None:
    kind = str(value)
    if "method" in stage.known and stage.type == "source-noise":
        if kind in NOISE_METHODS:
            stage.set("method", NOISE_METHODS[kind], name)
        else:
            stage.notice(name, f"no {kind!r} noise in tilechain (uniform, gaussian, normal, histogram); uniform is used")
    elif "fill" in stage.known:
        stage.set("fill", "noise", name)
        if kind != "uniform":
            stage.notice(name, f"{stage.type} fills its border with uniform noise; {kind!r} has no equivalent")
    else:
        stage.notice(name, f"{stage.type} makes no noise; it has no effect here")


def origin(stage: StageParams, name: str, value: Any) -> None:
    if stage.type != "reduce-crop":
        stage.notice(name, f"{stage.type} has no origin; it has no effect here")
        return
    if isinstance(value, Mapping):
        x, y = value.get("width", value.get("x", value.get("left"))), value.get("height", value.get("y", value.get("top")))
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        x, y = value
    else:
        raise ParamError(name, f"expected {{\"width\": x, \"height\": y}} or [x, y], got {value!r}")
    stage.set("left", x, name)
    stage.set("top", y, name)


def control(stage: StageParams, name: str, value: Any) -> None:
    """onnx-web names one ControlNet (a string) or lists conditions ({model, scale}); tilechain's
    `control` is {name: weight}."""
    if "control" not in stage.known:
        stage.notice(name, f"{stage.type} takes no ControlNet; it has no effect here")
        return
    if isinstance(value, str):
        stage.set("control", {value: 1.0}, name)
    elif isinstance(value, list) and all(isinstance(c, dict) and isinstance(c.get("model"), str) for c in value):
        stage.set("control", {c["model"]: as_number(c.get("scale", 1.0)) for c in value}, name)
    else:
        stage.set("control", value, name)  # a {name: weight} object, or refused by the schema


HIGHRES_PARAMS = {"highresScale": "scale", "highresSteps": "steps", "highresStrength": "strength",
                  "highresMethod": "method", "highresIterations": "iterations"}


def highres(stage: StageParams, name: str, value: Any) -> None:
    """onnx-web's highres request params are upscale-highres's own; elsewhere highres is that
    stage, added to the chain."""
    if stage.type == "upscale-highres" and name in HIGHRES_PARAMS:
        stage.set(HIGHRES_PARAMS[name], value, name)
    else:
        stage.notice(name, "highres is the upscale-highres stage: add it to the chain")


def output(stage: StageParams, name: str, value: Any) -> None:
    target = {"persist-disk": "filename", "persist-s3": "key"}.get(stage.type)
    if target is None:
        stage.notice(name, f"{stage.type} writes nothing; it has no effect here")
        return
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ParamError(name, f"expected a file name or a list of them, got {value!r}")
    if len(names) > 1:
        stage.notice(name, f"one name per image has no equivalent: '{target}' is a template ({{index}} numbers the images); the first name is used")
    stage.set(target, names[0], name)


# --- the table ------------------------------------------------------------------------------

NO_DIFFUSION = "the stage runs no diffusion model; it has no effect here"
DEVICE_WHY = "each stage runs on its service's device (TILECHAIN_DEVICE on the service); a chain cannot choose it"

RULES: tuple[Rule, ...] = (
    # image params (onnx-web's build_params)
    Rule("image", ("model",), "`model` (models.yaml names and their `aliases`, which include onnx-web's model names); notice on stages without a model", same(absent="the stage runs no model; it has no effect here")),
    Rule("image", ("prompt",), "`prompt`; notice on stages without one", same(absent=NO_DIFFUSION)),
    Rule("image", ("negativePrompt", "negative_prompt"), "`negative_prompt`; notice on stages without one", same("negative_prompt", NO_DIFFUSION)),
    Rule("image", ("cfg",), "`cfg`; notice on stages without one", same(absent=NO_DIFFUSION)),
    Rule("image", ("steps",), "`steps`; notice on stages without one", same(absent=NO_DIFFUSION)),
    Rule("image", ("seed",), "`seed` (-1 picks one); notice on stages without one", same(absent="the stage draws no random numbers; it has no effect here")),
    Rule("image", ("eta",), "`eta`; notice on stages without one", same(absent=NO_DIFFUSION)),
    Rule("image", ("scheduler",), "`scheduler`: onnx-web's names (euler-a, ddim, dpm-multi, ...) as well as diffusers class names (table below); notice on stages without one", same(absent=NO_DIFFUSION)),
    Rule("image", ("batch",), "`count` (images per request or per input image); notice on stages that make one image per input", batch),
    Rule("image", ("pipeline",), "notice: tilechain picks the diffusers pipeline from the stage type and the model's family in models.yaml", only("tilechain picks the diffusers pipeline from the stage type and the model's family in models.yaml")),
    Rule("image", ("lpw",), "notice: long prompts are not weighted (CLIP's 77 tokens)", only("long-prompt weighting has no equivalent; prompts are cut at CLIP's 77 tokens")),
    Rule("image", ("control",), "`control` of the diffusion stages with ControlNet (source-txt2img, blend-img2img, blend-inpaint, blend-controlnet): a name becomes {name: 1.0}, onnx-web's conditions [{model, scale}] become {model: scale}; notice elsewhere", control, other_forms=True),
    Rule("image", ("inversion",), "notice: no textual inversions (LoRAs are `loras`)", only("textual inversions have no equivalent; LoRAs are the stage's 'loras'")),
    Rule("image", ("loopback",), "notice: repeat the stage in the chain instead", only("no loopback: repeat the stage in the chain instead")),
    Rule("image", ("thumbnail",), "notice: add reduce-thumbnail and a persist stage for thumbnails", only("tilechain writes no thumbnails of its own: add reduce-thumbnail and a persist stage")),
    Rule("image", ("input_prompt", "input_negative_prompt"), "notice: onnx-web's record of the prompt before its prompt editing, which tilechain does not do", only("onnx-web's record of the prompt before prompt editing, which tilechain does not do")),
    Rule("image", ("tiled_vae", "vae_tile", "vae_overlap"), "notice: tilechain decodes each processing tile whole; the tile size is `tile`", only("tilechain decodes each processing tile whole (no VAE tiling inside a tile); the tile size is 'tile'")),
    Rule("tiles", ("unet_tile",), "`tile` (pixels); notice on stages without processing tiles of their own", tiles),
    Rule("tiles", ("unet_overlap",), "`overlap`: a fraction (0.25) times the tile in pixels, or pixels; notice when the tile is not a number", overlap, order=1),
    # tiling (StageParams)
    Rule("tiles", ("tiles", "tile_size"), "`tile` in pixels, from onnx-web's names (micro 64, mini 128, half 256, auto, hd1k 1024 ... hd64k 65536) or a number; `auto` is the model's native size (512 for SD 1.5, as onnx-web's); sizes past the stage's range use its largest (or smallest) tile, with a notice; notice on stages that pick their own processing tiles", tiles),
    Rule("tiles", ("overlap",), "`overlap`: pixels, or a fraction of the tile (0.25); notice on stages without one", overlap, order=1, other_forms=True),
    Rule("tiles", ("tile_order", "tileOrder"), "notice: each stage has its own order (spiral for diffusion, grid for the rest)", only("each stage has its own tile order (spiral for diffusion stages, grid for the others)")),
    # size (build_size)
    Rule("size", ("width", "height"), "`width`/`height` where the stage makes or cuts images (source-txt2img, source-noise, reduce-crop, reduce-thumbnail); notice elsewhere: the output size follows the input", same(absent="the stage's output size follows its input; it has no effect here")),
    # border (build_border)
    Rule("border", ("border",), "`border` on upscale-outpaint (every side); notice elsewhere", same(absent="only upscale-outpaint adds a border; it has no effect here")),
    Rule("border", ("left", "right", "top", "bottom"), "the same sides of upscale-outpaint (`left`/`top` are the corner of reduce-crop); notice elsewhere", same(absent="only upscale-outpaint adds a border (and reduce-crop has left/top); it has no effect here")),
    # upscale params (build_upscale)
    Rule("upscale", ("upscaling",), "`model` of upscale-* stages that run a model (onnx-web's upscaling model names are aliases in models.yaml); notice elsewhere", upscaling),
    Rule("upscale", ("upscale",), "a boolean: notice (onnx-web's on/off switch for its upscaling step; in a chain the stage is the step); a string: the upscaling model (`model`) of upscale-* stages, as onnx-web's example pipelines use it", upscale, other_forms=True),
    Rule("upscale", ("scale",), "upscale-simple: `scale`; spandrel upscalers: the final scale (`outscale`) unless outscale is given (the model's own factor comes from the model); the diffusion upscalers' own factor (x4, x2): a notice if it differs; notice elsewhere", scale),
    Rule("upscale", ("outscale",), "spandrel upscalers: `outscale`; upscale-simple: `scale` unless given; diffusion upscalers: a notice if it differs from their factor; notice elsewhere", scale),
    Rule("upscale", ("denoise",), "upscale-stable-diffusion: `noise_level` (0..1 times its 350; larger numbers as they are); notice elsewhere (no denoising-model blend)", denoise),
    Rule("upscale", ("correction",), "`model` of correct-gfpgan and correct-codeformer (onnx-web's names are aliases); notice elsewhere", correction),
    Rule("upscale", ("faces",), "a boolean: notice (faces are restored by correct-* stages in the chain); a list on correct-*: their own `faces` (face boxes)", only("faces are restored by correct-gfpgan and correct-codeformer stages in the chain"), other_forms=True),
    Rule("upscale", ("faceOutscale",), "correct-*: `upscale` (enlarge before restoring faces); notice elsewhere", face_outscale),
    Rule("upscale", ("faceStrength",), "correct-gfpgan: `strength`; correct-codeformer: `fidelity` (CodeFormer's weight, as onnx-web passes it); notice elsewhere", face_strength),
    Rule("upscale", ("upscaleOrder",), "notice: the order of the stages in the chain is the order", only("the order of the stages in the chain is the order")),
    Rule("upscale", ("tile_pad",), "spandrel upscalers: `overlap` (context pixels around each tile); notice elsewhere", same("overlap", "the stage has no tile context; it has no effect here")),
    Rule("upscale", ("pre_pad",), "notice: tilechain pads tiles with real neighbouring pixels (`overlap`)", only("tilechain pads tiles with real neighbouring pixels ('overlap'), not a mirrored border")),
    # highres (build_highres)
    Rule("highres", ("highres", "highresIterations", "highresMethod", "highresScale", "highresSteps", "highresStrength"), "upscale-highres: `iterations`, `method`, `scale`, `steps`, `strength`; notice elsewhere (highres is the upscale-highres stage)", highres),
    # stage params of onnx-web's stages
    Rule("stage", ("strength",), "`strength` (blend-img2img, blend-inpaint, upscale-outpaint); notice elsewhere", same(absent="the stage has no strength; it has no effect here")),
    Rule("stage", ("alpha",), "`alpha` of blend-linear; notice elsewhere", same(absent="only blend-linear mixes by alpha; it has no effect here")),
    Rule("stage", ("method",), "`method` of upscale-simple and reduce-thumbnail (bilinear, lanczos, ...); notice elsewhere", same(absent="the stage has no resampling method; it has no effect here")),
    Rule("stage", ("fill_color", "fillColor"), "upscale-outpaint: `fill` colour with `colour` (names like white become #rrggbb); notice elsewhere", colour_fill),
    Rule("stage", ("noise_source", "noise"), "source-noise: `method` (uniform, gaussian, normal as gaussian, histogram; fill-edge and fill-mask: uniform, with a notice); upscale-outpaint: `fill` noise (uniform: other kinds with a notice); notice elsewhere", noise_source),
    Rule("stage", ("mask_filter", "filter"), "notice: the mask's edge is softened by `mask_blur`", only("the mask's edge is softened by 'mask_blur'; onnx-web's mask filters have no equivalent")),
    Rule("stage", ("origin",), "reduce-crop: `left`/`top` from {\"width\": x, \"height\": y} or [x, y] (`width`/`height` are the rectangle's size); notice elsewhere", origin),
    Rule("stage", ("output",), "persist-disk: `filename`, persist-s3: `key` (a template; of a list of names the first is used, with a notice); notice elsewhere", output),
    Rule("stage", ("bucket", "endpoint_url", "profile_name"), "the same params of persist-s3 and source-s3; notice elsewhere", same(absent="the stage uses no S3; it has no effect here")),
    Rule("stage", ("source_keys",), "`keys` of source-s3; notice elsewhere", same("keys", "only source-s3 reads keys; it has no effect here")),
    Rule("stage", ("source_urls",), "`urls` of source-url; notice elsewhere", same("urls", "only source-url reads URLs; it has no effect here")),
    # device and experiments
    Rule("device", ("platform", "device"), "notice: each stage runs on its service's device (TILECHAIN_DEVICE); a chain cannot choose it", only(DEVICE_WHY)),
    Rule("experimental", ("experimental", "latentSymmetry", "promptEditing", "stride"), "notice: onnx-web's experiments have no equivalent", only("onnx-web's experimental features have no equivalent")),
)

RULE_FOR: dict[str, Rule] = {name: rule for rule in RULES for name in rule.names}
assert len(RULE_FOR) == sum(len(rule.names) for rule in RULES), "an onnx-web name has two rules"


def notice_text(name: str, why: str) -> str:
    return f"param '{name}' (onnx-web): {why}"


def translate(stage_type: str, raw: Mapping[str, Any], spec: stage_pb2.StageSpec) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A stage's params in tilechain's terms, and (param, why) for each onnx-web param that has
    no effect on it. ParamError names a param whose value cannot be read (a tile size that is
    none)."""
    known = {p.name: Param.from_proto(p) for p in spec.params}
    stage = StageParams(stage_type, known, raw)
    pending: list[tuple[Rule, str, Any]] = []
    # the stage's own names first: they win over onnx-web's spellings of the same param
    for name, value in raw.items():
        rule = RULE_FOR.get(name)
        if name in known:
            converted = coerce(known[name], value)
            if rule is None or not rule.other_forms or known[name].type_fits(converted):
                stage.params[name] = converted  # the schema check refuses a value that does not fit
                continue
        if rule is None:
            stage.params[name] = value  # neither knows it: the catalog check refuses it
        else:
            pending.append((rule, name, value))
    for rule, name, value in sorted(pending, key=lambda item: item[0].order):
        rule.apply(stage, name, value)
    return stage.params, stage.notices


def defaults_group(stage_type: str) -> str | None:
    return next((group for group, types in DEFAULTS_FOR.items() if stage_type in types), None)


def apply_defaults(
    stage_type: str, params: dict[str, Any], defaults: Mapping[str, Any], spec: stage_pb2.StageSpec
) -> tuple[str, list[tuple[str, str]]] | None:
    """Fill the unset params of a stage from the chain's `defaults` group that matches it
    (txt2img, img2img), through the same dialect. Returns the group and the (param, why) of
    its params that had no effect on this stage, or None when no group applies."""
    group = defaults_group(stage_type)
    if group is None or group not in defaults:
        return None
    filled, notices = translate(stage_type, defaults[group], spec)
    for name, value in filled.items():
        params.setdefault(name, value)
    return group, notices


class DefaultsUse:
    """Which of the chain's defaults took effect on some stage: a default is for a family of
    stages, so one that a stage of the family cannot use is only worth a notice when none of
    the chain's stages could."""

    def __init__(self, defaults: Mapping[str, Mapping[str, Any]]) -> None:
        self.defaults = defaults
        self.unused: dict[tuple[str, str], str] = {}
        self.used: set[tuple[str, str]] = set()

    def record(self, applied: tuple[str, list[tuple[str, str]]] | None) -> None:
        if applied is None:
            return
        group, notices = applied
        why = dict(notices)
        for name in self.defaults[group]:
            if name in why:
                self.unused.setdefault((group, name), why[name])
            else:
                self.used.add((group, name))

    def notices(self) -> list[str]:
        out = []
        for group, params in self.defaults.items():
            if not any((group, name) in self.used or (group, name) in self.unused for name in params):
                out.append(f"defaults.{group} (onnx-web): no stage of this chain takes them ({', '.join(DEFAULTS_FOR[group])})")
                continue
            for name in params:
                if (group, name) not in self.used:
                    out.append(f"defaults.{group}: {notice_text(name, self.unused[(group, name)])}")
        return out


def check_defaults(defaults: Any) -> dict[str, dict[str, Any]]:
    """The top-level `defaults`, checked: {"txt2img": {...}, "img2img": {...}}."""
    if defaults in (None, {}):
        return {}
    if not isinstance(defaults, Mapping):
        raise ParamError("defaults", f"expected an object with txt2img and/or img2img params, got {defaults!r}")
    for group, params in defaults.items():
        if group not in DEFAULTS_FOR:
            raise ParamError("defaults", f"unknown group {group!r}; onnx-web's defaults are {', '.join(DEFAULTS_FOR)}")
        if not isinstance(params, Mapping):
            raise ParamError("defaults", f"{group}: expected an object of params, got {params!r}")
        for name in params:
            if name not in RULE_FOR:
                raise ParamError("defaults", f"{group}: unknown param {name!r} (neither onnx-web nor tilechain takes it)")
    return {group: dict(params) for group, params in defaults.items()}


def platform_notice(platform: str) -> str:
    """The chain's top-level `platform`: onnx-web picks a device with it."""
    return f"platform {platform!r} (onnx-web): {DEVICE_WHY}"


# --- docs -----------------------------------------------------------------------------------

BEGIN = "<!-- dialect-table:begin (generated by `python -m tilechain.gateway.dialect` from gateway/dialect.py) -->"
END = "<!-- dialect-table:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "onnx-web.md"


def table() -> str:
    """The tables of docs/onnx-web.md: the params, then the scheduler names."""
    from tilechain.services.core.diffusion import SCHEDULERS

    rows = ["| onnx-web param | group | in tilechain |", "| --- | --- | --- |"]
    for rule in RULES:
        names = ", ".join(f"`{n}`" for n in rule.names)
        rows.append(f"| {names} | {rule.family} | {rule.meaning} |")
    rows += ["", "| scheduler name | diffusers class |", "| --- | --- |"]
    rows += [f"| `{name}` | `{cls}` |" for name, cls in SCHEDULERS.items()]
    return "\n".join(rows) + "\n"


def update_doc(path: Path = DOC) -> bool:
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    updated = text[:start] + "\n" + table() + text[end:]
    if updated != text:
        path.write_text(updated)
    return updated != text


if __name__ == "__main__":
    update_doc()
