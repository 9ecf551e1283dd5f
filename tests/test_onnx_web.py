"""onnx-web's own example pipelines (tests/data/onnx-web/, unchanged copies) run through
`tilechain run` and through `POST /v1/jobs` on the real stack and the local models. The files
ask for onnx-web's default sizes (512 px, 25 steps); these runs add onnx-web `defaults` (the
CLI's --defaults, the body's `defaults` key) for 64 px and one or two steps, which fill only the
params the files leave unset. The S3 stages write to the tests' SeaweedFS, which stands in for
the examples' endpoint (conftest.py), and boto3 reads back what they wrote."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tilechain import s3server
from tilechain.envoy import split_address
from tilechain.services.core.codecs import encode_image, read_metadata
from tilechain.stack import Stack

PIPELINES = Path(__file__).resolve().parent / "data" / "onnx-web"
FILES = sorted(p.name for p in PIPELINES.glob("*.json"))
SMALL = {"txt2img": {"width": 64, "height": 64, "steps": 1}, "img2img": {"steps": 2}}


def attachments(name: str) -> list[tuple[str, bytes]]:
    """codeformer.json starts with correct-codeformer: onnx-web sends it a `source:faces` image.
    A small one without a face keeps it quick (restoring faces is tests/test_faces.py's)."""
    if name != "codeformer.json":
        return []
    return [("source:faces", encode_image(np.random.default_rng(7).integers(0, 256, (64, 96, 3), dtype=np.uint8), "png"))]


def rest(stack: Stack, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    host, port = split_address(stack.addresses["envoy"])
    connection = http.client.HTTPConnection(host, port, timeout=300)
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def s3_object(stack: Stack, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return s3server.client(stack.addresses["s3"]).get_object(Bucket=bucket, Key=key)["Body"].read()


def check_artifacts(stack: Stack, output_root: Path, name: str, artifacts: list[dict]) -> None:
    """Every persist stage of the file wrote its image; S3 objects are what persist-s3 reported,
    byte for byte, with the same pixels as the disk copy."""
    document = json.loads((PIPELINES / name).read_text())
    persist = [s["name"] for s in document["stages"] if s["type"].startswith("persist-")]
    assert sorted(a["stage"] for a in artifacts) == sorted(persist)
    pixels = []
    for artifact in artifacts:
        if artifact["uri"].startswith("s3://"):
            data = s3_object(stack, artifact["uri"])
        else:
            data = (output_root / artifact["path"]).read_bytes()
        assert len(data) == int(artifact["size_bytes"]) and hashlib.sha256(data).hexdigest() == artifact["sha256"]
        assert read_metadata(data)["stages"][0]["name"] == document["stages"][0]["name"]
        pixels.append(np.asarray(Image.open(io.BytesIO(data))))
        assert pixels[-1].shape[:2] == (int(artifact["height"]), int(artifact["width"]))
    assert all(np.array_equal(pixels[0], p) for p in pixels[1:])


def test_the_fixtures_are_onnx_webs_files() -> None:
    """The copies are the files as onnx-web has them (see SOURCE.md), with their onnx-web params."""
    assert FILES == ["codeformer.json", "complex.json", "docs-example.json", "example.json", "outpaint-66733092.json", "outpaint.json"]
    example = json.loads((PIPELINES / "example.json").read_text())
    assert example["stages"][2]["params"] == {"model": "stable-diffusion-x4-upscaler", "prompt": "a magical wizard in a robe fighting a dragon", "scale": 4, "outscale": 4, "tile_size": 128}
    assert "MIT License" in (PIPELINES / "SOURCE.md").read_text()


@pytest.mark.parametrize("name", FILES)
def test_pipeline_through_tilechain_run(name: str, stack: Stack, output_root: Path, tmp_path: Path) -> None:
    inputs = []
    for target, data in attachments(name):
        path = tmp_path / "input.png"
        path.write_bytes(data)
        inputs += ["--input", f"{target}={path}"]
    out = subprocess.run(
        [sys.executable, "-m", "tilechain.cli", "run", str(PIPELINES / name), "--gateway", stack.addresses["gateway"],
         "--defaults", json.dumps(SMALL), *inputs],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "JOB_STATE_SUCCEEDED" in out.stdout
    written = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("wrote ")]
    document = json.loads((PIPELINES / name).read_text())
    assert len(written) == sum(1 for s in document["stages"] if s["type"].startswith("persist-"))
    for uri in written:
        data = s3_object(stack, uri) if uri.startswith("s3://") else Path(uri).read_bytes()
        assert np.asarray(Image.open(io.BytesIO(data))).size > 0
    if name != "example.json":  # the onnx-web params without effect are named (example.json has none)
        assert "(onnx-web):" in out.stderr


@pytest.mark.parametrize("name", FILES)
def test_pipeline_through_post_v1_jobs(name: str, stack: Stack, output_root: Path) -> None:
    body = json.loads((PIPELINES / name).read_text())
    body["defaults"] = SMALL
    body["attachments"] = [{"stage": stage, "data": base64.b64encode(data).decode()} for stage, data in attachments(name)]
    status, reply = rest(stack, "POST", "/v1/jobs", body)
    assert status == 200, reply
    job = json.loads(reply)["job_id"]
    status, stream = rest(stack, "GET", f"/v1/jobs/{job}:watch")  # streams until the job ends
    events = [json.loads(line) for line in stream.decode().splitlines() if line.strip()]
    assert status == 200 and events[-1]["status"]["state"] == "JOB_STATE_SUCCEEDED", events[-1]
    status, reply = rest(stack, "GET", f"/v1/jobs/{job}")
    job_status = json.loads(reply)
    assert job_status["state"] == "JOB_STATE_SUCCEEDED"
    stages = len(body["stages"])
    assert job_status["stages"] == {"current": stages, "total": stages}  # onnx-web's summary
    assert job_status["tiles"]["current"] == job_status["tiles"]["total"] > 0
    if any(s["type"] in ("source-txt2img", "upscale-stable-diffusion", "upscale-outpaint") for s in body["stages"]):
        assert job_status["steps"]["current"] == job_status["steps"]["total"] > 0
    check_artifacts(stack, output_root, name, job_status["artifacts"])
