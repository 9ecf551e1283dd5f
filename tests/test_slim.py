"""The slim install (requirements/slim.lock, no `models` extra) runs the gateway and the
model-free stages; the model stages are listed as unavailable and refused by name.

`make setup` builds that environment in var/venv-slim from the slim lock; these tests start a
stack from its interpreter, so no torch, diffusers or spandrel is importable in any process."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from tilechain import lock
from tilechain.client import chain_request, connect
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2

from .conftest import ROOT, SLIM_PYTHON, free_port, job_store_url
MODEL_MODULES = ("torch", "torchvision", "diffusers", "transformers", "spandrel", "cv2")
# the families a model-free chain needs, and the edit and text families; blend and correct stay down
COMPONENTS = ("source", "upscale", "reduce", "persist", "edit", "text", "gateway")


def slim(code: str) -> str:
    return subprocess.run([str(SLIM_PYTHON), "-c", code], check=True, capture_output=True, text=True).stdout


def test_slim_environment_is_exactly_the_slim_lock() -> None:
    result = subprocess.run(
        [str(SLIM_PYTHON), "-m", "tilechain.lock", "--check-installed", str(ROOT / "requirements" / "slim.lock")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


def test_slim_environment_has_no_model_libraries() -> None:
    found = slim(
        "import importlib.util as u; print(' '.join(m for m in %r if u.find_spec(m)))" % (MODEL_MODULES,)
    ).split()
    assert found == []
    installed = {n for n, _, _ in lock.pins(ROOT / "requirements" / "slim.lock")}
    assert "torch" not in installed


@pytest.fixture(scope="module")
def slim_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    output_root = tmp_path_factory.mktemp("slim-outputs").resolve()
    addresses = {c: f"127.0.0.1:{free_port()}" for c in (*COMPONENTS, "blend", "correct")}
    stack = Stack(addresses, tmp_path_factory.mktemp("slim-logs"), python=str(SLIM_PYTHON))
    env = {"TILECHAIN_OUTPUT_ROOT": str(output_root), "TILECHAIN_JOB_STORE": job_store_url(tmp_path_factory.mktemp("slim-jobs"))}
    stack.start(COMPONENTS, extra_env=env)
    yield stack, output_root
    stack.stop()


def test_model_free_chain_runs_without_torch(slim_stack: tuple[Stack, Path]) -> None:
    stack, output_root = slim_stack
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 96, "height": 64, "seed": 3}},
        {"name": "x2", "type": "upscale-simple", "params": {"scale": 2, "method": "bicubic"}},
        {"name": "small", "type": "reduce-thumbnail", "params": {"width": 80, "height": 80}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "slim/{job}.{ext}"}},
    ]}
    events = list(connect(stack.addresses["gateway"]).RunChain(chain_request(chain), timeout=60))
    status = events[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    written = np.asarray(Image.open(output_root / status.artifacts[0].path))
    assert written.shape == (53, 80, 3)
    assert written.std() > 10  # noise, resized: not a flat image


def test_model_stages_are_listed_unavailable(slim_stack: tuple[Stack, Path]) -> None:
    stack, _ = slim_stack
    from tilechain.v1 import stage_pb2, stage_pb2_grpc

    with grpc.insecure_channel(stack.addresses["source"]) as channel:
        catalog = stage_pb2_grpc.StageStub(channel).Describe(stage_pb2.DescribeRequest(), timeout=10)
    specs = {s.type: s for s in catalog.stages}
    assert specs["source-noise"].unavailable == ""
    assert specs["source-image"].unavailable == ""
    reason = specs["source-txt2img"].unavailable
    assert "torch" in reason and "diffusers" in reason and "tilechain[models]" in reason
    # the edit and text families: drawing, metadata and prompt transforms serve slim, the safety checker not
    for family, available, unavailable in (("edit", ("edit-text", "edit-metadata"), ("edit-safety",)), ("text", ("text-prompt",), ())):
        with grpc.insecure_channel(stack.addresses[family]) as channel:
            catalog = stage_pb2_grpc.StageStub(channel).Describe(stage_pb2.DescribeRequest(), timeout=10)
        specs = {s.type: s for s in catalog.stages}
        assert all(specs[t].unavailable == "" for t in available), family
        assert all("torch" in specs[t].unavailable for t in unavailable), family


def test_model_stage_is_refused_by_name(slim_stack: tuple[Stack, Path]) -> None:
    stack, _ = slim_stack
    chain = {"stages": [
        {"name": "gen", "type": "source-txt2img", "params": {"prompt": "a cat", "width": 64, "height": 64}},
        {"name": "save", "type": "persist-disk"},
    ]}
    with pytest.raises(grpc.RpcError) as info:
        list(connect(stack.addresses["gateway"]).RunChain(chain_request(chain), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "stage 'gen' (source-txt2img)" in info.value.details()
    assert "torch" in info.value.details()
    # and the stack keeps serving
    test_model_free_chain_runs_without_torch(slim_stack)


def test_prompt_model_is_refused_by_name_without_transformers(slim_stack: tuple[Stack, Path]) -> None:
    """text-prompt runs in the slim install; only its optional `model` needs the models extra."""
    stack, _ = slim_stack
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64}},
        {"name": "words", "type": "text-prompt", "params": {"prompt": "a cat", "model": "magic-prompt"}},
    ]}
    with pytest.raises(grpc.RpcError) as info:
        list(connect(stack.addresses["gateway"]).RunChain(chain_request(chain), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'words' (text-prompt): param 'model'" in info.value.details()
    assert "transformers" in info.value.details()
