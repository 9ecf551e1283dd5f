"""The web component (tilechain.web) in front of the session stack's Envoy, for the web tests:
`from .web_harness import web` makes the fixture available in a test module."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tilechain.stack import WEB, Stack

from .conftest import free_port


@pytest.fixture(scope="module")
def web(stack: Stack, output_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The web component's address ("host:port"), serving the session's output root."""
    address = f"127.0.0.1:{free_port()}"
    server = Stack({WEB: address, "envoy": stack.addresses["envoy"]}, tmp_path_factory.mktemp("web-logs"))
    try:
        server.start((WEB,), extra_env={"TILECHAIN_OUTPUT_ROOT": str(output_root)})
        yield address
    finally:
        server.stop()
