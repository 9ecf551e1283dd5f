"""Headless Chromium for the web page's tests and bench: Debian's `chromium` package (`make
setup` installs it), driven by Playwright with executable_path, never a browser Playwright
downloads. Playwright is a dev dependency; nothing at run time imports this."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

CHROMIUM_ENV = "TILECHAIN_CHROMIUM"
# as root and with no network: no sandbox, and none of Chromium's own connections out (each
# would be refused, and it retries)
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def chromium_path() -> str:
    """$TILECHAIN_CHROMIUM, else Debian's chromium binary (not its wrapper script), else chromium on PATH."""
    for candidate in (os.environ.get(CHROMIUM_ENV), "/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError(f"no chromium: `make setup` installs Debian's package (as root), or set {CHROMIUM_ENV}")


def launch(playwright: Any, extra_args: tuple[str, ...] = ()) -> Any:
    """A headless Chromium browser from a started sync_playwright()."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=[*CHROMIUM_ARGS, *extra_args])
