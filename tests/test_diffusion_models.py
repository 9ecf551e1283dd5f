"""The tiny diffusers models `make models` builds (tilechain/build_diffusion_models.py): each
pipeline folder loads offline with its pipeline class and runs; the img2img and inpaint
variants come from the same weights with from_pipe; the shared components really are shared;
the tokenizer; the LoRA changes tiny-sd15's output and unloading it restores it."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .conftest import ROOT

diffusers = pytest.importorskip("diffusers")

MODELS = ROOT / "var" / "models"
DIFFUSION = MODELS / "diffusion"
LORA = MODELS / "loras" / "tiny-sd15-style.safetensors"
PROMPT = "a photo of a cat sitting on a park bench, highly detailed"


@pytest.fixture(scope="module", autouse=True)
def quiet() -> None:
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load(cls_name: str, name: str):
    folder = DIFFUSION / name
    assert (folder / "model_index.json").is_file(), f"{folder} is missing; run `make models`"
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask(size: int) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray(mask)


def run(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)  # from_pipe does not carry it over
    kwargs.setdefault("num_inference_steps", 1)
    out = pipe(PROMPT, generator=torch.manual_seed(0), output_type="np", **kwargs).images
    assert np.isfinite(out).all()
    return out


@pytest.fixture(scope="module")
def sd15():
    return load("StableDiffusionPipeline", "tiny-sd15")


@pytest.fixture(scope="module")
def sdxl():
    return load("StableDiffusionXLPipeline", "tiny-sdxl")


# (folder, pipeline class, call kwargs, output height and width)
CASES = [
    ("tiny-sd15", "StableDiffusionPipeline", lambda: dict(height=64, width=64), 64),
    ("tiny-sd15-inpaint", "StableDiffusionInpaintPipeline",
     lambda: dict(image=picture(64), mask_image=square_mask(64), height=64, width=64), 64),
    ("tiny-sdxl", "StableDiffusionXLPipeline", lambda: dict(height=64, width=64), 64),
    ("tiny-sdxl-refiner", "StableDiffusionXLImg2ImgPipeline", lambda: dict(image=picture(64), strength=1.0), 64),
    ("tiny-sd-x4-upscaler", "StableDiffusionUpscalePipeline", lambda: dict(image=picture(16), noise_level=20), 64),
    ("tiny-sd-latent-x2", "StableDiffusionLatentUpscalePipeline", lambda: dict(image=picture(64)), 128),
]


@pytest.mark.parametrize("name, cls_name, kwargs, size", CASES, ids=[c[0] for c in CASES])
def test_pipeline_loads_and_runs(name: str, cls_name: str, kwargs, size: int) -> None:
    pipe = load(cls_name, name)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    assert run(pipe, **kwargs()).shape == (1, size, size, 3)


def test_config_numbers() -> None:
    """The numbers other code relies on: VAE factors, native sizes (models.yaml), channels."""
    import yaml

    base = yaml.safe_load((ROOT / "models.yaml").read_text())["base"]
    for name in ("tiny-sd15", "tiny-sd15-inpaint", "tiny-sdxl", "tiny-sdxl-refiner"):
        pipe = load("DiffusionPipeline", name)
        assert pipe.vae_scale_factor == 8
        assert pipe.unet.config.sample_size * pipe.vae_scale_factor == base[name.removeprefix("tiny-")]["native"]
    assert load("DiffusionPipeline", "tiny-sd15-inpaint").unet.config.in_channels == 9
    x4 = load("StableDiffusionUpscalePipeline", "tiny-sd-x4-upscaler")
    assert x4.vae_scale_factor == 4 and x4.vae.config.scaling_factor == 0.08333
    assert x4.unet.config.in_channels == 7 and x4.config.max_noise_level == 350
    refiner = load("StableDiffusionXLImg2ImgPipeline", "tiny-sdxl-refiner")
    assert refiner.text_encoder is None and refiner.tokenizer is None and refiner.config.requires_aesthetics_score


def test_shared_components_are_the_same_weights() -> None:
    def weights(name: str, component: str) -> dict[str, torch.Tensor]:
        files = sorted((DIFFUSION / name / component).glob("*.safetensors"))
        assert len(files) == 1, files
        return load_file(files[0])

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    sd_vae = weights("tiny-sd15", "vae")
    assert same(sd_vae, weights("tiny-sd15-inpaint", "vae"))
    assert same(sd_vae, weights("tiny-sd-latent-x2", "vae"))
    assert same(weights("tiny-sd15", "text_encoder"), weights("tiny-sd15-inpaint", "text_encoder"))
    assert same(weights("tiny-sdxl", "vae"), weights("tiny-sdxl-refiner", "vae"))
    assert same(weights("tiny-sdxl", "text_encoder_2"), weights("tiny-sdxl-refiner", "text_encoder_2"))


def test_sd15_img2img_and_inpaint_from_pipe(sd15) -> None:
    img2img = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(sd15)
    inpaint = diffusers.StableDiffusionInpaintPipeline.from_pipe(sd15)  # masked img2img on the 4-channel UNet
    assert img2img.unet is sd15.unet and inpaint.vae is sd15.vae
    assert run(img2img, image=picture(64), strength=1.0).shape == (1, 64, 64, 3)
    assert run(inpaint, image=picture(64), mask_image=square_mask(64), height=64, width=64).shape == (1, 64, 64, 3)


def test_sdxl_img2img_and_inpaint_from_pipe(sdxl) -> None:
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    inpaint = diffusers.StableDiffusionXLInpaintPipeline.from_pipe(sdxl)
    assert img2img.unet is sdxl.unet and inpaint.text_encoder_2 is sdxl.text_encoder_2
    assert run(img2img, image=picture(64), strength=1.0).shape == (1, 64, 64, 3)
    # (SDXL inpainting's default strength is 0.9999: one step of it rounds to none)
    assert run(inpaint, image=picture(64), mask_image=square_mask(64), height=64, width=64,
               strength=1.0).shape == (1, 64, 64, 3)


def test_latent_upscaler_takes_sd15_latents(sd15) -> None:
    latents = sd15(PROMPT, height=64, width=64, num_inference_steps=1, generator=torch.manual_seed(0),
                   output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    upscaler = load("StableDiffusionLatentUpscalePipeline", "tiny-sd-latent-x2")
    assert run(upscaler, image=latents).shape == (1, 128, 128, 3)


def test_refiner_takes_sdxl_latents(sdxl) -> None:
    latents = sdxl(PROMPT, height=64, width=64, num_inference_steps=1, generator=torch.manual_seed(0),
                   output_type="latent").images
    refiner = load("StableDiffusionXLImg2ImgPipeline", "tiny-sdxl-refiner")
    assert run(refiner, image=latents, strength=0.5, num_inference_steps=2).shape == (1, 64, 64, 3)


def test_tokenizer() -> None:
    from transformers import CLIPTokenizer

    folder = DIFFUSION / "tiny-sd15" / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.model_max_length == 77
    ids = tokenizer("The quick brown fox jumps over the lazy dog, 4k photo!").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "thequickbrownfoxjumpsoverthelazydog,4kphoto!"
    long = tokenizer(" ".join(["mountain"] * 100), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == tokenizer.eos_token_id
    encoder = load("StableDiffusionPipeline", "tiny-sd15").text_encoder
    assert encoder.config.vocab_size == len(tokenizer)
    assert encoder.config.eos_token_id == tokenizer.eos_token_id


def test_lora_changes_the_output_and_unloads(sd15) -> None:
    assert LORA.is_file(), f"{LORA} is missing; run `make models`"
    # two steps: SD 1.5's scheduler config (leading spacing, steps_offset 1) puts a single
    # step at t=1, where the UNet's prediction hardly matters
    plain = run(sd15, height=64, width=64, num_inference_steps=2)
    sd15.load_lora_weights(str(LORA), adapter_name="style")
    try:
        styled = run(sd15, height=64, width=64, num_inference_steps=2)
    finally:
        sd15.unload_lora_weights()
    assert np.abs(styled - plain).max() > 0.05
    np.testing.assert_allclose(run(sd15, height=64, width=64, num_inference_steps=2), plain, atol=1e-6)
