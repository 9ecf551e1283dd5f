"""The default local diffusers models `make models` builds (through tilechain.build_models): the
real diffusers architectures (SD 1.5, its inpainting UNet, SDXL base and refiner, the x4 and the
latent x2 upscalers, Kandinsky 2.2 and its inpainting decoder, InstructPix2Pix) with small random
weights, saved with `save_pretrained` as local pipeline folders, plus a LoRA for tiny-sd15,
ControlNets for tiny-sd15 and tiny-sdxl, a DPT depth estimator (a ControlNet preprocessor), the SD
safety checker, a GPT-2 for text-prompt, and the tokenizers, written here (no download). They prove the loading, tiling and chaining paths offline, in CI, on
a CPU; they draw noise, not pictures.

Sizes follow the real models' structure, shrunk (sizes from diffusers' own test components):
the SD VAEs downscale by 8 (4 block levels), the x4 upscaler's by 4 (3 levels); a UNet's
`sample_size` times the VAE factor is the model's native size (256 px here). Components that the
real models share are the same weights here too (each component is built right after
`torch.manual_seed(0)`, so rebuilding one model alone gives the same weights):

- tiny-sd15, tiny-sd15-inpaint and tiny-sd-latent-x2 share one VAE (their latents are
  compatible); tiny-sd15 and tiny-sd15-inpaint also share the text encoder.
- tiny-sdxl and tiny-sdxl-refiner share the VAE and the second text encoder.
- tiny-kandinsky22 and tiny-kandinsky22-inpaint share everything but the decoder's UNet.

Each builder writes one model to the path it is given (a folder, or the LoRA's file); the
caller writes into a temporary name and renames it when complete. diffusers and transformers are
imported inside the builders, so importing this module is cheap."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

# --- the tokenizer --------------------------------------------------------------------------

MAX_LENGTH = 77  # CLIP's context, as every SD text encoder has it
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# The merges are learned here (plain BPE, ties broken by the pair's text, so always the same)
# from these words, until each is one token, as common words are in the real vocabulary; other
# words split into pieces of them or, at worst, into byte-level tokens (each byte also has a
# word-final `</w>` form), so no text is unknown.
CORPUS = """
a an the of and or in on at by for from to with without into over under above below near far
is are was were be been has have had it its this that these those his her their our your my
very more most less much many some all any no not one two three four five six seven eight ten
i you he she we they me him them who what where when how which while as like than then there
photo photograph picture image portrait painting drawing sketch illustration render rendering
art artwork artist style concept digital oil watercolor pencil ink charcoal acrylic canvas
cinematic dramatic lighting light dark shadow shadows sunlight moonlight golden hour sunset
sunrise night day morning evening dusk dawn sky clouds cloud rain snow fog mist storm weather
beautiful detailed highly intricate sharp focus soft smooth realistic photorealistic hyper
ultra quality best masterpiece high resolution hd award winning trending professional studio
camera lens wide angle close up shot view background foreground depth field bokeh blur
color colors colorful vibrant bright warm cold blue red green yellow orange purple pink
black white gray brown silver gold
man woman person people girl boy child old young face eyes hair smile standing sitting walking
running holding wearing looking dress shirt coat hat suit armor
cat dog horse bird fish dragon lion tiger wolf bear fox owl butterfly flower flowers tree
trees forest garden grass leaves mountain mountains river lake ocean sea beach water waves
island desert field meadow valley hill rock rocks stone cave waterfall landscape nature
city street town village house building castle tower bridge road car train ship boat room
window door table chair wall floor kitchen library church temple ruins market cafe
space planet star stars moon sun galaxy astronaut robot futuristic fantasy magic science
fiction cyberpunk steampunk medieval ancient modern vintage retro abstract surreal epic
small large big huge tiny little tall long short round square glowing shining floating
flying riding eating playing reading sleeping dancing burning frozen broken empty
""".split()


def byte_encoder() -> dict[int, str]:
    """CLIP's (and GPT-2's) printable stand-in for each of the 256 bytes; its order (the
    printable bytes first) is the order of CLIP's vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


@functools.cache
def learn_merges(words: tuple[str, ...] = tuple(CORPUS)) -> list[tuple[str, str]]:
    """Byte-pair merges, the most frequent pair first, until every word is one symbol."""
    encode = byte_encoder()
    frequency: dict[tuple[str, ...], int] = {}
    for word in words:
        symbols = [encode[b] for b in word.lower().encode()]
        symbols[-1] += "</w>"
        frequency[tuple(symbols)] = frequency.get(tuple(symbols), 0) + 1
    merges: list[tuple[str, str]] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, n in frequency.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, n in frequency.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        frequency = merged
    return merges


@functools.cache
def tokenizer_vocab() -> dict[str, int]:
    """The real CLIP vocabulary's layout: the bytes, the bytes with `</w>`, the merges' tokens,
    then the two special tokens (the end-of-text token has the highest id, as in CLIP)."""
    chars = list(byte_encoder().values())
    tokens = dict.fromkeys(chars + [c + "</w>" for c in chars] + [a + b for a, b in learn_merges()] + [BOS, EOS])
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt, the files a CLIP tokenizer is made from (and that the slow
    CLIPTokenizer of transformers 4.x needs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learn_merges()), encoding="utf-8")


def tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tokenizer_files(folder)
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS,
            "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True,
        }))
        return CLIPTokenizer.from_pretrained(folder)


# --- components -----------------------------------------------------------------------------


def seeded(make: Callable[[], Any]) -> Any:
    """A component built right after seeding, so it is the same whichever model builds it."""
    torch.manual_seed(0)
    return make().eval()


def text_encoder(hidden_size: int = 32, act: str = "quick_gelu", projection: bool = False, projection_dim: int = 32):
    """A CLIP text transformer: `quick_gelu` as OpenAI's CLIP ViT-L (SD 1.x, SDXL's first
    encoder), `gelu` as OpenCLIP's (SD 2.x, SDXL's second encoder). Three layers, so that
    SDXL's penultimate hidden states and a clip_skip of 2 exist."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = tokenizer_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act=act, layer_norm_eps=1e-5,
        projection_dim=projection_dim, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )
    return seeded(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(config))


def vae(levels: int = 4, scaling_factor: float = 0.18215, sample_size: int = 256, force_upcast: bool = True):
    """AutoencoderKL with the real block structure (downscale 2**(levels-1)), tiny channels."""
    from diffusers import AutoencoderKL

    channels = (16, 16, 32, 32)[-levels:]
    return seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=8, sample_size=sample_size, scaling_factor=scaling_factor, force_upcast=force_upcast,
    ))


def sd15_vae():
    return vae(levels=4, scaling_factor=0.18215)


SD15_UNET = dict(
    sample_size=32, out_channels=4, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
    attention_head_dim=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def sd15_unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return seeded(lambda: UNet2DConditionModel(in_channels=in_channels, **SD15_UNET))


def sd15_scheduler():
    from diffusers import PNDMScheduler

    # SD 1.5's own scheduler_config.json
    return PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )


# SDXL: the first text encoder's hidden states and the second's are concatenated for the
# cross-attention (768 + 1280 = 2048 in the real model); the UNet's added embedding takes six
# time ids (the refiner: five, with the aesthetic score) of addition_time_embed_dim each, plus
# the second encoder's pooled projection (6 * 256 + 1280 = 2816; refiner 5 * 256 + 1280 = 2560).
# Two different widths here, so that mixing the encoders up fails loudly.
SDXL_TE1, SDXL_TE2, SDXL_PROJECTION, SDXL_TIME_EMBED = 32, 64, 64, 8


def sdxl_unet(refiner: bool = False):
    from diffusers import UNet2DConditionModel

    time_ids = 5 if refiner else 6
    return seeded(lambda: UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=SDXL_TE2 if refiner else SDXL_TE1 + SDXL_TE2,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * SDXL_TIME_EMBED + SDXL_PROJECTION,
    ))


def sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL's own scheduler_config.json
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
        use_karras_sigmas=False,
    )


def sdxl_vae():
    return vae(levels=4, scaling_factor=0.13025)


def sdxl_text_encoder_2():
    return text_encoder(SDXL_TE2, act="gelu", projection=True, projection_dim=SDXL_PROJECTION)


# --- the pipelines --------------------------------------------------------------------------


def sd15():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=sd15_vae(), text_encoder=text_encoder(32), tokenizer=tokenizer(), unet=sd15_unet(4),
        scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sd15_inpaint():
    """An inpainting checkpoint: 9 UNet input channels (latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(
        vae=sd15_vae(), text_encoder=text_encoder(32), tokenizer=tokenizer(), unet=sd15_unet(9),
        scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sdxl():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=sdxl_vae(), text_encoder=text_encoder(SDXL_TE1), text_encoder_2=sdxl_text_encoder_2(),
        tokenizer=tokenizer(), tokenizer_2=tokenizer(), unet=sdxl_unet(refiner=False), scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def sdxl_refiner():
    """The refiner: only the second text encoder, and the aesthetic score among the time ids."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        vae=sdxl_vae(), text_encoder=None, tokenizer=None, text_encoder_2=sdxl_text_encoder_2(),
        tokenizer_2=tokenizer(), unet=sdxl_unet(refiner=True), scheduler=sdxl_scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )


def sd_x4_upscaler():
    """stabilityai/stable-diffusion-x4-upscaler's structure: the UNet sees the noisy latents and
    the (noised) low-res image (4 + 3 = 7 channels) at the low-res size, the noise level as a
    class label (an embedding of 1000, levels up to max_noise_level 350); the VAE decodes 4x."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    unet = seeded(lambda: UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
        only_cross_attention=(True, True, False), num_class_embeds=1000,
    ))
    # the real model's schedulers (linear_start 0.0001, linear_end 0.02; v-prediction)
    low_res_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
        clip_sample=True, prediction_type="epsilon", variance_type="fixed_small",
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionUpscalePipeline(
        vae=vae(levels=3, scaling_factor=0.08333, sample_size=256, force_upcast=True),
        text_encoder=text_encoder(32, act="gelu"), tokenizer=tokenizer(), unet=unet,
        low_res_scheduler=low_res_scheduler, scheduler=scheduler, max_noise_level=350,
    )


def sd_latent_x2():
    """stabilityai/sd-x2-latent-upscaler's structure: a k-diffusion UNet (Fourier time
    embedding, K blocks, 1x1 in/out convs) over the noisy latents and the nearest-upscaled SD
    latents (4 + 4 = 8 channels, out 4 + 1), conditioned on the text's hidden states and, as
    `timestep_cond`, a 128-wide noise-level embedding plus the pooled text (128 + 32); SD 1.x's
    VAE (tiny-sd15's here) encodes pixel input and decodes the 2x latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline, UNet2DConditionModel

    hidden = 32
    unet = seeded(lambda: UNet2DConditionModel(
        in_channels=8, out_channels=5, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
        mid_block_type=None, only_cross_attention=False, act_fn="gelu", attention_head_dim=8, norm_num_groups=None,
        cross_attention_dim=hidden, time_cond_proj_dim=128 + hidden, conv_in_kernel=1, conv_out_kernel=1,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
    ))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="sample",
    )
    return StableDiffusionLatentUpscalePipeline(
        vae=sd15_vae(), text_encoder=text_encoder(hidden), tokenizer=tokenizer(), unet=unet, scheduler=scheduler,
    )


# Kandinsky 2.2 (kandinsky-community/kandinsky-2-2-prior and -decoder, as diffusers' combined
# pipelines join them): a CLIP text encoder and an unCLIP prior turn the prompt into a CLIP image
# embedding, which a UNet conditions on (`image_proj` and `image` added embedding, no text
# cross-attention) to denoise the latents of MoVQ, a VQ autoencoder (4 levels: 8x, as the real
# one; not SD's VAE, so the model hands over pixels). Sizes from diffusers' own test dummies; the
# image embedding is 32 wide (1280 in the real model, CLIP ViT-bigG's). Native size 16 * 8 = 128
# px (64 would be below the blend stages' default overlap). Kandinsky's decoder rounds the latent
# size up to a multiple of 8, so exact image sizes are multiples of 64 px.
KANDINSKY_EMBED = 32


def kandinsky22_prior():
    from diffusers import PriorTransformer

    def make():
        prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=KANDINSKY_EMBED, num_layers=1,
                                 num_embeddings=MAX_LENGTH)
        # the real prior stores the CLIP image embeddings' mean and std; a zero std (the
        # initial value) would make every embedding the mean
        prior.clip_std = torch.nn.Parameter(torch.ones_like(prior.clip_std))
        return prior
    return seeded(make)


def kandinsky22_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # the prior's unconditional embedding is this encoder's embedding of a black 224 px image
    config = CLIPVisionConfig(
        hidden_size=KANDINSKY_EMBED, image_size=224, patch_size=14, projection_dim=KANDINSKY_EMBED, intermediate_size=37,
        num_attention_heads=4, num_channels=3, num_hidden_layers=3, hidden_act="gelu",
    )
    return seeded(lambda: CLIPVisionModelWithProjection(config))


def kandinsky22_image_processor():
    from transformers import CLIPImageProcessor

    # the real prior's preprocessor_config.json (OpenAI's CLIP normalisation)
    return CLIPImageProcessor(
        crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True, resample=3, size=224,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def kandinsky22_unet(in_channels: int = 4):
    """The decoder's UNet: 8 output channels (noise and learned variance); 9 input channels in
    the inpainting decoder (latents, masked-image latents, mask)."""
    from diffusers import UNet2DConditionModel

    return seeded(lambda: UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        encoder_hid_dim=KANDINSKY_EMBED, encoder_hid_dim_type="image_proj", cross_attention_dim=32,
        attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
    ))


def movq():
    """MoVQ: a VQModel with spatially conditioned norms (their GroupNorm has 32 groups, so the
    widths are multiples of 32); downscale 2**(levels-1) = 8."""
    from diffusers import VQModel

    return seeded(lambda: VQModel(
        in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=12,
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, norm_type="spatial",
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, sample_size=128,
    ))


def kandinsky22_components(inpaint: bool = False) -> dict[str, Any]:
    from diffusers import DDPMScheduler, UnCLIPScheduler

    return dict(
        unet=kandinsky22_unet(9 if inpaint else 4),
        # the real models' scheduler classes: DDPM for the decoder (which takes no eta), unCLIP for the prior
        scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
            steps_offset=1, prediction_type="epsilon", thresholding=False,
        ),
        movq=movq(),
        prior_prior=kandinsky22_prior(),
        prior_image_encoder=kandinsky22_image_encoder(),
        prior_text_encoder=text_encoder(KANDINSKY_EMBED, act="gelu", projection=True, projection_dim=KANDINSKY_EMBED),
        prior_tokenizer=tokenizer(),
        prior_scheduler=UnCLIPScheduler(
            num_train_timesteps=1000, variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
            clip_sample_range=10.0,
        ),
        prior_image_processor=kandinsky22_image_processor(),
    )


def kandinsky22():
    """Kandinsky 2.2 text-to-image (prior + decoder), the folder AutoPipelineForText2Image loads;
    its img2img pipeline comes from it with from_pipe."""
    from diffusers import KandinskyV22CombinedPipeline

    return KandinskyV22CombinedPipeline(**kandinsky22_components())


def kandinsky22_inpaint():
    """Kandinsky 2.2 inpainting (kandinsky-2-2-decoder-inpaint's structure: a 9-channel UNet;
    Kandinsky's inpainting pipeline always feeds it the mask and masked-image latents, so the
    text-to-image decoder cannot inpaint). Prior, MoVQ and text encoder are tiny-kandinsky22's."""
    from diffusers import KandinskyV22InpaintCombinedPipeline

    return KandinskyV22InpaintCombinedPipeline(**kandinsky22_components(inpaint=True))


def save_pipeline(make: Callable[[], Any]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        pipe = make()
        pipe.save_pretrained(folder, safe_serialization=True)
        # transformers 5 writes tokenizer.json alone (Kandinsky's combined pipelines name theirs prior_tokenizer)
        for name in ("tokenizer", "tokenizer_2", "prior_tokenizer"):
            if getattr(pipe, name, None) is not None:
                write_tokenizer_files(folder / name)
    return write


# --- the LoRA -------------------------------------------------------------------------------

LORA_RANK = 4


def sd15_lora(path: Path) -> None:
    """A rank-4 LoRA on tiny-sd15's attention projections (UNet and text encoder), in the file
    format `pipe.load_lora_weights(path)` reads. peft starts lora_B at zero (a no-op); here both
    A and B are random, so the LoRA visibly changes the output."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, encoder = sd15_unet(4), text_encoder(32)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    encoder.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for model in (unet, encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn_like(param) * 0.5)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, weight_name="lora.safetensors", safe_serialization=True,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder)),
            unet_lora_adapter_metadata=lora_metadata(unet),
            text_encoder_lora_adapter_metadata=lora_metadata(encoder),
        )
        (Path(tmp) / "lora.safetensors").replace(path)


def lora_metadata(model) -> dict[str, Any]:
    """The adapter's LoraConfig (rank, alpha, targets), stored in the file; sets sorted, so the
    file is the same on every build."""
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


# --- ControlNets, InstructPix2Pix, the safety checker ----------------------------------------


def controlnet(unet: Callable[[], Any], seed: int):
    """A ControlNet made as the real ones start their training: `ControlNetModel.from_unet`
    copies the UNet's encoder; its zero convolutions (the control image's way in, and the
    outputs into the UNet) start at zero, which would make it ignore its control image, so here
    they are random (seeded per ControlNet), as the LoRA's B matrices are."""
    from diffusers import ControlNetModel

    def make():
        net = ControlNetModel.from_unet(unet(), conditioning_embedding_out_channels=(8, 16, 32, 32))
        torch.manual_seed(seed)
        with torch.no_grad():
            for block in (*net.controlnet_down_blocks, net.controlnet_mid_block):
                block.weight.copy_(torch.randn_like(block.weight) * 0.1)
            # the control image's encoder: He-initialised without biases, so that what comes out
            # depends on the image (default init and biases make it nearly constant)
            for conv in net.controlnet_cond_embedding.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(conv.weight)
                    torch.nn.init.zeros_(conv.bias)
        return net
    return seeded(make)


def save_model(make: Callable[[], Any]) -> Callable[[Path], None]:
    """A single diffusers or transformers model, saved as a folder (save_pretrained)."""
    def write(folder: Path) -> None:
        quiet()
        make().save_pretrained(folder, safe_serialization=True)
    return write


def quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def sd15_pix2pix():
    """InstructPix2Pix (timbrooks/instruct-pix2pix's structure): SD 1.5 with an 8-channel UNet
    input, the noisy latents and the input image's latents."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(
        vae=sd15_vae(), text_encoder=text_encoder(32), tokenizer=tokenizer(), unet=sd15_unet(8),
        scheduler=EulerAncestralDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        ),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def safety_checker(folder: Path) -> None:
    """diffusers' StableDiffusionSafetyChecker (CompVis/stable-diffusion-safety-checker's
    structure: a CLIP vision tower, a projection, 17 concept and 3 special-care embeddings with
    their thresholds) with a tiny random tower, and the CLIP image processor it reads images
    with. The thresholds are 1.0 (a cosine similarity never exceeds it), so this checker flags
    nothing unless a stage raises its `adjustment`; the concept embeddings are random."""
    from transformers import CLIPConfig
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=1000,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),  # unused by the checker
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32),
        projection_dim=32,
    )

    def make():
        checker = StableDiffusionSafetyChecker(config)
        with torch.no_grad():
            checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
            checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        return checker
    quiet()
    seeded(make).save_pretrained(folder, safe_serialization=True)
    kandinsky22_image_processor().save_pretrained(folder)  # OpenAI's CLIP preprocessing, as the real one


def depth_estimator(folder: Path) -> None:
    """A DPT depth estimator (Intel/dpt-hybrid-midas's kind, as transformers' depth-estimation
    pipeline loads it) with a tiny random ViT, and its image processor: the model preprocessor
    for depth ControlNets."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=64, patch_size=16,
        neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[4, 2, 1, 0.5],
    )
    quiet()
    seeded(lambda: DPTForDepthEstimation(config)).save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(folder)


def prompt_model(folder: Path) -> None:
    """A text-generation model for text-prompt (onnx-web uses MagicPrompt, a GPT-2): GPT-2's
    architecture, tiny and random, with a byte-level GPT-2 tokenizer of the 256 byte symbols
    and no merges (written here, as the CLIP one is). It continues a prompt with random bytes."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i for i, symbol in enumerate(byte_encoder().values())}
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    quiet()
    GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=EOS, bos_token=EOS, eos_token=EOS).save_pretrained(folder)
    config = GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=32, n_layer=2, n_head=2, bos_token_id=vocab[EOS], eos_token_id=vocab[EOS])
    seeded(lambda: GPT2LMHeadModel(config)).save_pretrained(folder, safe_serialization=True)


# relative path under the models root -> a writer of that path (a pipeline folder or a file)
MODELS: dict[str, Callable[[Path], None]] = {
    "diffusion/tiny-sd15": save_pipeline(sd15),
    "diffusion/tiny-sd15-inpaint": save_pipeline(sd15_inpaint),
    "diffusion/tiny-sdxl": save_pipeline(sdxl),
    "diffusion/tiny-sdxl-refiner": save_pipeline(sdxl_refiner),
    "diffusion/tiny-sd-x4-upscaler": save_pipeline(sd_x4_upscaler),
    "diffusion/tiny-sd-latent-x2": save_pipeline(sd_latent_x2),
    "diffusion/tiny-kandinsky22": save_pipeline(kandinsky22),
    "diffusion/tiny-kandinsky22-inpaint": save_pipeline(kandinsky22_inpaint),
    "loras/tiny-sd15-style.safetensors": sd15_lora,
    "controlnets/tiny-sd15-canny": save_model(lambda: controlnet(lambda: sd15_unet(4), seed=1)),
    "controlnets/tiny-sd15-softedge": save_model(lambda: controlnet(lambda: sd15_unet(4), seed=2)),
    "controlnets/tiny-sdxl-canny": save_model(lambda: controlnet(lambda: sdxl_unet(refiner=False), seed=3)),
    "diffusion/tiny-sd15-pix2pix": save_pipeline(sd15_pix2pix),
    "safety/tiny-safety-checker": safety_checker,
    "preprocessors/tiny-dpt": depth_estimator,
    "prompts/tiny-gpt2": prompt_model,
}
