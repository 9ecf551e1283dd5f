"""onnx-web's dialect (gateway/dialect.py) against the real stage schemas, one test per family
of params; model aliases; scheduler names; the table in docs/onnx-web.md. No stack: the
translation runs on the catalogs the stage classes publish (the gateway's end of it is in
tests/test_onnx_web.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from tilechain.gateway import dialect
from tilechain.services.core.models import ModelRegistry
from tilechain.services.core.params import Param, ParamError, validate_params
from tilechain.services.core.stage import load_all

ROOT = Path(__file__).resolve().parents[1]
SPECS = {name: cls.spec() for name, cls in load_all().items()}


def translate(stage_type: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Translated params, validated against the stage's schema, and the notices by param."""
    spec = SPECS[stage_type]
    translated, notices = dialect.translate(stage_type, params, spec)
    validate_params([Param.from_proto(p) for p in spec.params], translated)
    return translated, dict(notices)


# a value of the form onnx-web's chains give, for every name it knows
SAMPLES: dict[str, Any] = {
    "model": "stable-diffusion-onnx-v1-5", "prompt": "a wizard", "negativePrompt": "blur", "negative_prompt": "blur",
    "cfg": 6, "steps": "4", "seed": -1, "eta": 0.0, "scheduler": "euler-a", "batch": 2, "pipeline": "txt2img",
    "lpw": False, "control": "canny", "inversion": "x", "loopback": 1, "thumbnail": True, "input_prompt": "a",
    "input_negative_prompt": "b", "tiled_vae": True, "vae_tile": 512, "vae_overlap": 0.25, "unet_tile": 256,
    "unet_overlap": 0.25, "tiles": "mini", "tile_size": 128, "overlap": 0.25, "tile_order": "spiral", "tileOrder": "grid",
    "width": "128", "height": 128, "border": 64, "left": 8, "right": 8, "top": 8, "bottom": 8,
    "upscaling": "upscaling-real-esrgan-x4-plus", "upscale": True, "scale": 4, "outscale": 4, "denoise": 0.5,
    "correction": "correction-gfpgan-v1-3", "faces": True, "faceOutscale": 2, "faceStrength": 0.5,
    "upscaleOrder": "correction-first", "tile_pad": 10, "pre_pad": 0, "highres": True, "highresIterations": 1,
    "highresMethod": "lanczos", "highresScale": 2, "highresSteps": 10, "highresStrength": 0.2, "strength": 0.5,
    "alpha": 0.5, "method": "lanczos", "fill_color": "white", "fillColor": "#ff0000", "noise_source": "histogram",
    "noise": "uniform", "mask_filter": "none", "filter": "none", "origin": {"width": 0, "height": 0},
    "output": "out.png", "bucket": "b", "endpoint_url": "", "profile_name": "", "source_keys": ["k.png"],
    "source_urls": ["https://example.com/a.png"], "platform": "cuda", "device": "cuda", "experimental": {},
    "latentSymmetry": {}, "promptEditing": {}, "stride": 8,
}


def test_every_onnx_web_param_is_mapped_or_noticed_on_every_stage() -> None:
    """Each name onnx-web knows, on each stage: it becomes one of the stage's own params, or a
    notice says why it has no effect; never a refusal for being unknown."""
    assert set(SAMPLES) == set(dialect.RULE_FOR), "a rule without a sample, or a sample without a rule"
    for stage_type, spec in SPECS.items():
        own = {p.name for p in spec.params}
        for name, value in SAMPLES.items():
            translated, notices = dialect.translate(stage_type, {name: value}, spec)
            assert set(translated) <= own, (stage_type, name, translated)
            agrees = stage_type in dialect.FIXED_SCALE and name in ("scale", "outscale") and value == dialect.FIXED_SCALE[stage_type]
            assert translated or notices or agrees, (stage_type, name)  # (x4 on the x4 upscaler is what it does)
            for param, why in notices:
                assert param == name and why, (stage_type, name, why)


def test_unknown_names_are_left_for_the_schema_to_refuse() -> None:
    translated, notices = dialect.translate("upscale-simple", {"sclae": 2}, SPECS["upscale-simple"])
    assert translated == {"sclae": 2} and not notices
    with pytest.raises(ParamError) as info:
        validate_params([Param.from_proto(p) for p in SPECS["upscale-simple"].params], translated)
    assert info.value.param == "sclae" and "unknown param" in info.value.message


def test_a_stage_param_of_the_wrong_type_is_refused_not_noticed() -> None:
    """onnx-web's spelling of a stage's own param: a value that does not fit is the stage's
    error, unless onnx-web has another form of it (a boolean `upscale` or `faces`)."""
    translated, notices = dialect.translate("upscale-simple", {"scale": "two"}, SPECS["upscale-simple"])
    assert translated == {"scale": "two"} and not notices
    with pytest.raises(ParamError, match="expected an integer"):
        translate("upscale-simple", {"scale": "two"})
    assert translate("correct-codeformer", {"faces": True})[0] == {}
    assert translate("correct-codeformer", {"faces": [[0, 0, 64, 64]]})[0] == {"faces": [[0, 0, 64, 64]]}


def test_tiles() -> None:
    assert translate("blend-img2img", {"tiles": "mini"})[0]["tile"] == 128
    assert translate("blend-img2img", {"tile_size": "256"})[0]["tile"] == 256
    assert translate("blend-img2img", {"tiles": "auto"})[0]["tile"] == "auto"  # the model's native size
    params, notices = translate("upscale-stable-diffusion", {"tiles": "hd8k"})
    assert params["tile"] == 4096 and "above upscale-stable-diffusion's largest tile" in notices["tiles"]
    params, notices = translate("blend-img2img", {"tiles": "micro"})
    assert params["tile"] == 64 and not notices
    params, notices = translate("upscale-resrgan", {"tile_size": 128, "tile_pad": 16})
    assert (params["tile"], params["overlap"]) == (128, 16)
    params, notices = translate("blend-img2img", {"unet_tile": 256, "unet_overlap": 0.25})
    assert (params["tile"], params["overlap"]) == (256, 64)
    params, notices = translate("blend-img2img", {"overlap": 0.25})  # a fraction of an 'auto' tile
    assert "overlap" not in params and "needs a tile in pixels" in notices["overlap"]
    params, notices = translate("persist-disk", {"tiles": "hd8k", "tile_order": "spiral"})
    assert params == {} and "a tile size has no effect here" in notices["tiles"] and "own tile order" in notices["tile_order"]
    with pytest.raises(ParamError) as info:
        translate("blend-img2img", {"tiles": "hd3k"})
    assert info.value.param == "tiles" and "micro (64)" in info.value.message


def test_image_params() -> None:
    params, notices = translate("source-txt2img", {
        "negativePrompt": "blur", "batch": 2, "steps": "4", "cfg": "6.5", "scheduler": "euler-a",
        "pipeline": "lpw", "lpw": True, "tiled_vae": True, "model": "stable-diffusion-onnx-v1-5",
    })
    assert params["negative_prompt"] == "blur" and params["count"] == 2
    assert params["steps"] == 4 and params["cfg"] == 6.5  # strings, as onnx-web takes them
    assert params["scheduler"] == "euler-a" and params["model"] == "stable-diffusion-onnx-v1-5"
    assert set(notices) == {"pipeline", "lpw", "tiled_vae"}
    # the stage's own name wins over onnx-web's spelling of it
    params, notices = translate("blend-img2img", {"negative_prompt": "mine", "negativePrompt": "theirs"})
    assert params["negative_prompt"] == "mine" and "is given too" in notices["negativePrompt"]
    params, notices = translate("persist-disk", {"prompt": "a wizard", "batch": 2, "model": "x"})
    assert params == {} and set(notices) == {"prompt", "batch", "model"}


def test_size_and_border() -> None:
    assert translate("source-txt2img", {"width": "256", "height": 128.0})[0] == {"width": 256, "height": 128}
    params, notices = translate("blend-img2img", {"width": 256})
    assert "follows its input" in notices["width"]
    params, notices = translate("upscale-outpaint", {"border": "256", "left": 8})
    assert (params["border"], params["left"]) == (256, 8)
    params, notices = translate("upscale-simple", {"border": 256, "right": 8})
    assert set(notices) == {"border", "right"}


def test_upscale_params() -> None:
    params, notices = translate("upscale-resrgan", {"upscaling": "upscaling-real-esrgan-x2-plus", "scale": 2})
    assert params == {"model": "upscaling-real-esrgan-x2-plus", "outscale": 2.0} and not notices
    params, notices = translate("upscale-resrgan", {"scale": 4, "outscale": 2, "upscale": True, "denoise": 0.5})
    assert params == {"outscale": 2.0} and set(notices) == {"scale", "upscale", "denoise"}
    params, notices = translate("upscale-stable-diffusion", {"upscale": "stable-diffusion-x4-upscaler", "scale": 4, "outscale": 4, "denoise": 0.2})
    assert params == {"model": "stable-diffusion-x4-upscaler", "noise_level": 70} and not notices
    params, notices = translate("upscale-stable-diffusion", {"outscale": 2})
    assert "always enlarges x4" in notices["outscale"]
    assert translate("upscale-simple", {"outscale": 3})[0] == {"scale": 3}
    assert translate("upscale-simple", {"scale": "1"})[0] == {"scale": 1}  # onnx-web's pass-through
    params, notices = translate("correct-gfpgan", {"correction": "correction-gfpgan-v1-3", "faceStrength": 0.7, "faceOutscale": 2, "upscale": True})
    assert params == {"model": "correction-gfpgan-v1-3", "strength": 0.7, "upscale": 2}
    assert "switch for its upscaling step" in notices["upscale"]  # a boolean on the int param: converted, not refused
    params, notices = translate("correct-codeformer", {"faceStrength": 0.3, "faces": True, "upscaleOrder": "correction-last"})
    assert params == {"fidelity": 0.3} and set(notices) == {"faces", "upscaleOrder"}
    params, notices = translate("blend-img2img", {"upscaling": "x", "correction": "y", "faceStrength": 0.5, "highres": True})
    assert params == {} and set(notices) == {"upscaling", "correction", "faceStrength", "highres"}


def test_stage_params() -> None:
    params, notices = translate("upscale-outpaint", {"border": 64, "fill_color": "white", "mask_filter": "gaussian-multiply"})
    assert (params["fill"], params["colour"]) == ("colour", "#ffffff") and set(notices) == {"mask_filter"}
    params, notices = translate("upscale-outpaint", {"border": 64, "noise_source": "histogram"})
    assert params["fill"] == "noise" and "uniform noise" in notices["noise_source"]
    assert translate("source-noise", {"noise_source": "normal"})[0] == {"method": "gaussian"}
    assert translate("source-noise", {"noise": "histogram"})[0] == {"method": "histogram"}
    assert translate("reduce-crop", {"origin": {"width": 8, "height": 16}, "width": 32, "height": 32})[0] == {"left": 8, "top": 16, "width": 32, "height": 32}
    assert translate("reduce-crop", {"origin": [4, 2], "width": 8, "height": 8})[0]["left"] == 4
    assert translate("persist-disk", {"output": "mine-{index}.png"})[0] == {"filename": "mine-{index}.png"}
    params, notices = translate("persist-s3", {"bucket": "b", "output": ["a.png", "b.png"]})
    assert params["key"] == "a.png" and "first name is used" in notices["output"]
    assert translate("source-s3", {"bucket": "b", "source_keys": ["a.png"]})[0] == {"bucket": "b", "keys": ["a.png"]}
    assert translate("source-url", {"source_urls": ["https://example.com/a.png"]})[0] == {"urls": ["https://example.com/a.png"]}
    assert translate("blend-linear", {"alpha": "0.25"})[0] == {"alpha": 0.25}
    with pytest.raises(ParamError) as info:
        translate("upscale-outpaint", {"border": 8, "fill_color": "not-a-colour"})
    assert info.value.param == "fill_color"


def test_device_and_experiments() -> None:
    params, notices = translate("source-txt2img", {"platform": "cuda", "device": "cuda:1", "experimental": {}, "stride": 8})
    assert params == {} and set(notices) == {"platform", "device", "experimental", "stride"}
    assert "TILECHAIN_DEVICE" in dialect.platform_notice("cuda")


def test_defaults_fill_unset_params_of_matching_stages() -> None:
    defaults = dialect.check_defaults({"txt2img": {"width": 64, "steps": 2, "negativePrompt": "blur"}, "img2img": {"steps": 3, "strength": 0.8}})
    use = dialect.DefaultsUse(defaults)
    txt2img = {"width": 128}
    use.record(dialect.apply_defaults("source-txt2img", txt2img, defaults, SPECS["source-txt2img"]))
    assert txt2img == {"width": 128, "steps": 2, "negative_prompt": "blur"}  # the stage's own width wins
    upscaler: dict[str, Any] = {}
    use.record(dialect.apply_defaults("upscale-stable-diffusion", upscaler, defaults, SPECS["upscale-stable-diffusion"]))
    assert upscaler == {"steps": 3}
    assert dialect.apply_defaults("persist-disk", {}, defaults, SPECS["persist-disk"]) is None
    # strength fitted no stage of this chain (the upscaler has none): one notice for the chain
    assert use.notices() == ["defaults.img2img: param 'strength' (onnx-web): the stage has no strength; it has no effect here"]
    for bad in ({"txt2img": {"bogus": 1}}, {"inpaint": {}}, {"txt2img": 3}, [1]):
        with pytest.raises(ParamError):
            dialect.check_defaults(bad)


def test_onnx_web_model_names_resolve_to_the_local_models() -> None:
    registry = ModelRegistry(ROOT / "models.yaml", ROOT / "var" / "models")
    expected = {
        ("base", "stable-diffusion-onnx-v1-5"): "sd15", ("base", "stable-diffusion-onnx-v1-inpainting"): "sd15-inpaint",
        ("base", "upscaling-stable-diffusion-x4"): "sd-x4-upscaler", ("base", "stable-diffusion-x4-upscaler"): "sd-x4-upscaler",
        ("upscalers", "upscaling-real-esrgan-x2-plus"): "esrgan-x2", ("upscalers", "upscaling-real-esrgan-x4-plus"): "esrgan-x4",
        ("upscalers", "upscaling-real-esrgan-x4-v3"): "compact-x4", ("faces", "correction-gfpgan-v1-3"): "gfpgan",
        ("faces", "correction-codeformer"): "codeformer",
    }
    for (kind, name), entry in expected.items():
        resolved = registry.resolve(kind, name)
        assert resolved.name == entry and resolved.path is not None and resolved.path.exists(), name


def test_an_alias_used_twice_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("upscalers:\n  a: {path: a.pth, aliases: [x]}\n  b: {path: b.pth, aliases: [x]}\n")
    with pytest.raises(ValueError, match="alias 'x' names both a and b"):
        ModelRegistry(config, tmp_path)
    config.write_text("upscalers:\n  a: {path: a.pth, aliases: [b]}\n  b: {path: b.pth}\n")
    with pytest.raises(ValueError, match="both a model and another model's alias"):
        ModelRegistry(config, tmp_path)


def test_every_scheduler_name_constructs_a_scheduler() -> None:
    from tilechain.services.core.diffusion import SCHEDULERS, scheduler_class
    from tilechain.services.core.stage import module_installed

    config = json.loads((ROOT / "var/models/diffusion/tiny-sd15/scheduler/scheduler_config.json").read_text())
    for name, class_name in SCHEDULERS.items():
        if name == "dpm-sde" and not module_installed("torchsde"):
            with pytest.raises(ParamError, match="needs torchsde"):
                scheduler_class(name)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some adjust their config and say so
            scheduler = scheduler_class(name).from_config(config)
            scheduler.set_timesteps(4)
        assert type(scheduler).__name__ == class_name, name
    assert scheduler_class("EulerDiscreteScheduler").__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ParamError, match="short names: ddim"):
        scheduler_class("no-such-scheduler")


def test_docs_table_is_current() -> None:
    text = dialect.DOC.read_text()
    table = text[text.index(dialect.BEGIN) + len(dialect.BEGIN) : text.index(dialect.END)]
    assert table.strip() == dialect.table().strip(), "docs/onnx-web.md is stale: run `python -m tilechain.gateway.dialect`"


def test_controlnet_names_and_conditions_become_control() -> None:
    translated, notices = translate("blend-controlnet", {"control": "canny"})
    assert translated["control"] == {"canny": 1.0} and not notices
    conditions = [{"model": "canny", "scale": 0.5}, {"model": "softedge", "scale": "0.25"}]
    translated, _ = translate("source-txt2img", {"control": conditions})
    assert translated["control"] == {"canny": 0.5, "softedge": 0.25}
    _, notices = translate("upscale-simple", {"control": "canny"})
    assert "takes no ControlNet" in notices["control"]


def test_highres_params_are_upscale_highres_params() -> None:
    onnx = {"highresScale": 2, "highresSteps": "3", "highresStrength": 0.2, "highresMethod": "bicubic", "highresIterations": 2}
    translated, notices = translate("upscale-highres", onnx)
    assert translated == {"scale": 2, "steps": 3, "strength": 0.2, "method": "bicubic", "iterations": 2} and not notices
    _, notices = translate("blend-img2img", {"highresScale": 2})
    assert "upscale-highres stage" in notices["highresScale"]
