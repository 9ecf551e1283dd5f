"""Face restoration on a real photo (scikit-image's astronaut), through the gateway."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from skimage.data import astronaut

from tilechain.client import chain_request
from tilechain.services.core.codecs import encode_image
from tilechain.services.core.resample import resize
from tilechain.services.correct import cascade_path, detect_faces, face_crop
from tilechain.v1 import gateway_pb2

from .conftest import rpc_error, run_events
from .test_upscale_models import REGISTRY

PHOTO = resize(astronaut(), 256, 256, "lanczos")


def run_correct(gateway, stage_type: str, params: dict, image: np.ndarray = PHOTO):
    chain = {"stages": [{"name": "load", "type": "source-image"}, {"name": "face", "type": stage_type, "params": params}]}
    request = chain_request(chain, [("load", "image", encode_image(image, "png"))], return_tiles=gateway_pb2.TILE_RETURN_FINAL)
    events = run_events(gateway, request, timeout=180)
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    canvas = next(e.tile.canvas for e in events if e.WhichOneof("kind") == "tile")
    out = np.zeros((canvas.height, canvas.width, 3), dtype=np.uint8)
    for e in events:
        if e.WhichOneof("kind") == "tile":
            t = e.tile.tile
            out[t.y : t.y + t.height, t.x : t.x + t.width] = np.frombuffer(t.pixels, np.uint8).reshape(t.height, t.width, 3)
    notices = [e.notice.message for e in events if e.WhichOneof("kind") == "notice"]
    return out, notices


def test_haar_cascade_finds_the_astronauts_face() -> None:
    faces = detect_faces(astronaut(), cascade_path(REGISTRY.resolve("detectors", "haar-frontal")), 48)
    assert len(faces) == 1
    face = faces[0]
    # her face is around (225, 115) in the 512 x 512 photo
    assert face.x < 225 < face.x1 and face.y < 115 < face.y1


@pytest.mark.parametrize("stage_type", ["correct-gfpgan", "correct-codeformer"])
def test_face_restored_in_place_and_nothing_else_touched(gateway, stage_type: str) -> None:
    out, notices = run_correct(gateway, stage_type, {"min_face": 32})
    assert notices == ["image 0: restored 1 face(s)"]
    face = detect_faces(PHOTO, cascade_path(REGISTRY.resolve("detectors", "haar-frontal")), 32)[0]
    crop = face_crop(face, 256, 256)
    changed = np.argwhere((out != PHOTO).any(axis=2))
    assert len(changed) > 0.5 * face.area  # the random-weight model changes the face
    assert changed[:, 0].min() >= crop.y and changed[:, 0].max() < crop.y1
    assert changed[:, 1].min() >= crop.x and changed[:, 1].max() < crop.x1


def test_no_face_passes_the_image_unchanged(gateway) -> None:
    grey = np.full((128, 160, 3), 120, dtype=np.uint8)
    out, notices = run_correct(gateway, "correct-gfpgan", {}, grey)
    assert np.array_equal(out, grey)
    assert notices == ["image 0: no face found; passed unchanged"]


def test_explicit_faces_strength_and_upscale(gateway) -> None:
    untouched, _ = run_correct(gateway, "correct-gfpgan", {"faces": [[90, 40, 48, 48]], "strength": 0.0})
    assert np.array_equal(untouched, PHOTO)
    bigger, notices = run_correct(gateway, "correct-gfpgan", {"faces": [[90, 40, 48, 48]], "upscale": 2})
    assert bigger.shape == (512, 512, 3)
    assert notices == ["image 0: restored 1 face(s)"]
    # away from the face the result is the lanczos x2 of the photo
    assert np.array_equal(bigger[400:, :], resize(PHOTO, 512, 512, "lanczos")[400:, :])


@pytest.mark.parametrize(
    "params, fragments",
    [
        ({"faces": [[1, 2, 3]]}, ["param 'faces'", "[x, y, width, height]"]),
        ({"faces": [[250, 250, 40, 40]]}, ["param 'faces'", "reaches past the 256x256 image"]),
        ({"model": "esrgan-x4"}, ["param 'model'", "unknown model 'esrgan-x4'"]),
        ({"model": "upscalers/esrgan-x4.safetensors"}, ["param 'model'", "is a SR model", "takes FaceSR"]),
        ({"detector": "yolo"}, ["param 'detector'", "unknown model 'yolo'"]),
    ],
)
def test_bad_face_params(gateway, params: dict, fragments: list[str]) -> None:
    chain = {"stages": [{"name": "load", "type": "source-image"}, {"name": "face", "type": "correct-gfpgan", "params": params}]}
    error = rpc_error(gateway, chain_request(chain, [("load", "image", encode_image(PHOTO, "png"))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'face' (correct-gfpgan)" in error.details()
    for fragment in fragments:
        assert fragment in error.details()
