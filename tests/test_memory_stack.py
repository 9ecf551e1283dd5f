"""Memory bounded by the tiles in flight, with real processes: a fast source feeding a slower
stage through the gateway keeps every process far below the canvases it streams, and the
services import no model library for model-free work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from PIL import Image

from tilechain.client import chain_request, connect
from tilechain.stack import Stack, process_memory
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc

from .conftest import free_port

SERVICES = ("source", "upscale", "reduce", "persist")
EDGE = 4096  # source canvas; x2 makes the 8192² canvas (201 MB of RGB) that upscale and reduce stream
MiB = 1 << 20


@pytest.fixture(scope="module")
def lean_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    components = (*SERVICES, "gateway")
    stack = Stack({c: f"127.0.0.1:{free_port()}" for c in components}, tmp_path_factory.mktemp("lean-logs"))
    stack.start(components=components, extra_env={
        "TILECHAIN_OUTPUT_ROOT": str(tmp_path_factory.mktemp("lean-outputs")),
        "TILECHAIN_MAX_PIXELS": str(8192 * 8192),
    })
    yield stack
    stack.stop()


def test_a_fast_source_feeding_a_slower_stage_keeps_every_process_flat(lean_stack: Stack) -> None:
    pids = {c: lean_stack.processes[c].pid for c in (*SERVICES, "gateway")}
    idle = {c: process_memory(pid)["VmRSS"] * 1024 for c, pid in pids.items()}
    stubs = {c: stage_pb2_grpc.StageStub(grpc.insecure_channel(lean_stack.addresses[c])) for c in SERVICES}
    for stub in stubs.values():
        stub.Stats(stage_pb2.StatsRequest(reset_peaks=True), timeout=30)
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": EDGE, "height": EDGE, "seed": 4}},
        {"name": "x2", "type": "upscale-simple", "params": {"scale": 2, "method": "lanczos"}},
        {"name": "thumb", "type": "reduce-thumbnail", "params": {"width": 512, "height": 512}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "flat-{job}.{ext}"}},
    ]}
    events = list(connect(lean_stack.addresses["gateway"]).RunChain(chain_request(chain), timeout=600))
    status = events[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    with Image.open(status.artifacts[0].uri.removeprefix("file://")) as image:
        assert image.size == (512, 512)

    stats = {c: stubs[c].Stats(stage_pb2.StatsRequest(wait_idle=True), timeout=60) for c in SERVICES}
    source_bytes, big_bytes = EDGE * EDGE * 3, (2 * EDGE) ** 2 * 3
    # the engines: upscale reads its input only as it has room for it (the source is far
    # faster); reduce streams; neither holds more than rows of tiles
    assert 0 < stats["upscale"].peak_input_bytes < source_bytes / 4
    assert stats["upscale"].peak_output_bytes < big_bytes / 32
    assert stats["upscale"].peak_ready_tiles <= 16  # MAX_READY, plus those one input tile completes at once
    assert 0 < stats["reduce"].peak_input_bytes < big_bytes / 32
    assert stats["source"].peak_output_bytes < source_bytes / 32
    # every process, as the kernel counts it: the peak above its idle size stays a fraction
    # of the 201 MB canvas that went through it (the whole-canvas engine held over 1 GB here)
    for component, pid in pids.items():
        rise = process_memory(pid)["VmHWM"] * 1024 - idle[component]
        assert rise < big_bytes / 3, f"{component} rose {rise / MiB:.0f} MiB for a {big_bytes / MiB:.0f} MiB canvas"


def test_model_free_services_never_import_a_model_library(lean_stack: Stack) -> None:
    """Idle, and after model-free work, no service has torch loaded: it comes with the first
    model stage planned (or preloaded)."""
    for component in SERVICES:
        maps = Path(f"/proc/{lean_stack.processes[component].pid}/maps").read_text()
        assert "libtorch" not in maps, f"{component} has torch loaded"


def test_creating_any_service_imports_no_model_library() -> None:
    code = (
        "import sys\n"
        "from tilechain.services.core.config import Settings\n"
        "from tilechain.services.core.servicer import StageServicer\n"
        "for family in ('source', 'blend', 'correct', 'upscale', 'persist', 'reduce'):\n"
        "    StageServicer(family, Settings.from_env())\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'spandrel', 'cv2') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
