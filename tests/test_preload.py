"""Preloading: a fresh stack told to preload the default models reports SERVING only once they
are loaded, and the first job of each model family right after start-up succeeds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest

from tilechain.client import chain_request, connect
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2

from .conftest import ROOT, free_port

COMPONENTS = ("source", "correct", "upscale", "gateway")
PRELOAD = "source-txt2img:sd15, correct-gfpgan:gfpgan, correct-codeformer:codeformer, upscale-resrgan:esrgan-x4"


@pytest.fixture(scope="module")
def preloaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack({c: f"127.0.0.1:{free_port()}" for c in COMPONENTS}, tmp_path_factory.mktemp("preload-logs"))
    stack.start(components=COMPONENTS, extra_env={
        "TILECHAIN_PRELOAD": PRELOAD,
        "TILECHAIN_MODELS_ROOT": str(ROOT / "var" / "models"),
        "TILECHAIN_MODELS_CONFIG": str(ROOT / "models.yaml"),
        "TILECHAIN_OUTPUT_ROOT": str(tmp_path_factory.mktemp("preload-outputs")),
    })
    yield stack
    stack.stop()


def test_serving_means_the_preload_list_is_loaded(preloaded: Stack) -> None:
    logs = {c: (preloaded.log_dir / f"{c}.log").read_text() for c in ("source", "correct", "upscale")}
    for component, expected in {
        "source": ["source-txt2img:sd15"],
        "correct": ["correct-gfpgan:gfpgan", "correct-codeformer:codeformer"],
        "upscale": ["upscale-resrgan:esrgan-x4"],
    }.items():
        log = logs[component]
        # written before the health check flipped, which Stack.start waited for
        assert "NOT_SERVING until start-up work is done" in log
        preloaded_line = next(line for line in log.splitlines() if "preloaded:" in line)
        for name in expected:
            assert name in preloaded_line
        assert log.index("preloaded:") < log.index("serving tilechain.v1.Stage")


def test_the_first_job_of_each_model_family_succeeds(preloaded: Stack) -> None:
    noise = {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64, "seed": 1}}
    chains = {
        "txt2img": [{"name": "gen", "type": "source-txt2img", "params": {"width": 64, "height": 64, "steps": 1, "seed": 3}}],
        "gfpgan": [noise, {"name": "faces", "type": "correct-gfpgan", "params": {"faces": [[8, 8, 40, 40]]}}],
        "codeformer": [noise, {"name": "faces", "type": "correct-codeformer", "params": {"faces": [[8, 8, 40, 40]]}}],
        "esrgan": [noise, {"name": "x4", "type": "upscale-resrgan", "params": {"model": "esrgan-x4"}}],
    }
    gateway = connect(preloaded.addresses["gateway"])

    def run(stages: list[dict]) -> gateway_pb2.JobStatus:
        events = list(gateway.RunChain(chain_request({"stages": stages}), timeout=600))
        return events[-1].status

    with ThreadPoolExecutor(len(chains)) as pool:  # all at once, first thing
        results = dict(zip(chains, pool.map(run, chains.values())))
    for name, status in results.items():
        assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, f"{name}: {status.message}"
    assert results["esrgan"].stages_done == 2


def test_a_typo_in_the_preload_list_stops_the_service(tmp_path) -> None:
    stack = Stack({"reduce": f"127.0.0.1:{free_port()}"}, tmp_path)
    with pytest.raises(RuntimeError, match="reduce failed to start: exited with status 1"):
        stack.start(components=("reduce",), extra_env={"TILECHAIN_PRELOAD": "esrgan-x5"})
    assert "preload: unknown model 'esrgan-x5'" in (tmp_path / "reduce.log").read_text()
    assert stack.processes == {} or all(p.poll() is not None for p in stack.processes.values())
