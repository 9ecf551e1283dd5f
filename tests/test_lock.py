"""The dependency locks: in step with pyproject.toml, free of hosts and paths, consistent with
each other, and what this environment actually runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tilechain import lock

ROOT = Path(__file__).resolve().parents[1]
LOCK_PATHS = {spec.name: ROOT / spec.path for spec in lock.LOCKS}


@pytest.mark.parametrize("name", sorted(LOCK_PATHS))
def test_lock_was_compiled_from_this_pyproject(name: str) -> None:
    recorded = lock.recorded_fingerprint(LOCK_PATHS[name])
    assert recorded == lock.fingerprint(ROOT), (
        f"{LOCK_PATHS[name].name} was compiled from another pyproject.toml: run `make lock`"
    )


def test_fingerprint_follows_the_dependency_ranges(tmp_path: Path) -> None:
    text = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text)
    before = lock.fingerprint(tmp_path)
    (tmp_path / "pyproject.toml").write_text(text.replace('"pyyaml>=6,<7"', '"pyyaml>=6,<8"'))
    assert lock.fingerprint(tmp_path) != before
    # prose elsewhere in the file does not count
    (tmp_path / "pyproject.toml").write_text(text.replace("Chain pipelines", "Chained pipelines"))
    assert lock.fingerprint(tmp_path) == before


@pytest.mark.parametrize("name", sorted(LOCK_PATHS))
def test_lock_names_no_host_index_or_path(name: str) -> None:
    text = LOCK_PATHS[name].read_text()
    assert not re.search(r"[a-z+]+://|--(extra-)?index-url|--find-links|^-f |^-e ", text, re.M)
    assert not re.search(r"(^|\s)/(home|root|tmp|work|opt|usr|var)/", text)
    assert "tilechain" not in {n for n, _, _ in lock.pins(LOCK_PATHS[name])}


@pytest.mark.parametrize("name", sorted(LOCK_PATHS))
def test_every_pin_has_hashes(name: str) -> None:
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK_PATHS[name].read_text())
    pinned = [b for b in blocks if "==" in b.split("\n", 1)[0]]
    assert pinned
    for block in pinned:
        assert "--hash=sha256:" in block, block.split("\n", 1)[0]


def test_locks_agree_on_versions() -> None:
    dev = {(n, m): v for n, v, m in lock.pins(LOCK_PATHS["dev"])}
    for name in ("models", "slim"):
        for package, version, marker in lock.pins(LOCK_PATHS[name]):
            assert dev.get((package, marker)) == version, f"{name}.lock: {package} {version} differs from dev.lock"


def test_slim_lock_holds_no_model_libraries() -> None:
    slim = {n for n, _, _ in lock.pins(LOCK_PATHS["slim"])}
    assert not slim & {"torch", "torchvision", "diffusers", "transformers", "spandrel", "opencv-python-headless"}
    models = {n for n, _, _ in lock.pins(LOCK_PATHS["models"])}
    assert {"torch", "diffusers", "spandrel"} <= models
    assert "pytest" not in models


def test_ml_stack_has_upper_bounds() -> None:
    specs = lock.pyproject(ROOT)["project"]["optional-dependencies"]["models"]
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "spandrel"):
        spec = next(s for s in specs if re.match(rf"{package}\b", s))
        assert "<" in spec, f"{spec}: the ML stack needs an upper bound"


def test_this_environment_is_exactly_the_dev_lock() -> None:
    """What `make` checked after installing (pip list against the lock), checked again here."""
    assert lock.installed_mismatches(LOCK_PATHS["dev"]) == []


def test_installed_check_finds_a_difference(tmp_path: Path) -> None:
    text = LOCK_PATHS["dev"].read_text()
    version = next(v for n, v, _ in lock.pins(LOCK_PATHS["dev"]) if n == "pyyaml")
    altered = tmp_path / "altered.lock"
    altered.write_text(re.sub(rf"^pyyaml=={re.escape(version)}", "pyyaml==0.0.1", text, flags=re.M))
    problems = lock.installed_mismatches(altered)
    assert problems == [f"pyyaml: locked 0.0.1, installed {version}"]
    assert lock.main(["--check-installed", str(altered)]) == 1


def test_make_installs_from_the_lock_without_resolving() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r $(LOCK)" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile
    assert re.search(r"^lock:", makefile, re.M)
    assert sys.prefix != sys.base_prefix  # the tests run in the venv `make` built

