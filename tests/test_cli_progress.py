"""`tilechain run` while the chain runs: plain progress lines when stderr is not a terminal, bars
with rates and time left on a terminal, and --preview, the final image written as it arrives."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from tilechain.stack import Stack

CHAIN = {"stages": [
    {"name": "noise", "type": "source-noise", "params": {"width": 256, "height": 256, "method": "gaussian", "seed": 9}},
    {"name": "enlarge", "type": "upscale-simple", "params": {"scale": 4}},
    {"name": "save", "type": "persist-disk", "params": {"filename": "cli-progress/{job}-{stage}.{ext}"}},
]}


def chain_file(tmp_path: Path, scale: int = 4) -> Path:
    chain = json.loads(json.dumps(CHAIN))
    chain["stages"][1]["params"]["scale"] = scale
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(chain))
    return path


def command(stack: Stack, chain: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tilechain.cli", "run", str(chain), "--gateway", stack.addresses["gateway"], "--transport-tile", "128", *args]


def written(stdout: str) -> Path:
    [line] = [line for line in stdout.splitlines() if line.startswith("wrote ")]
    return Path(line.split()[1])


def test_plain_lines_when_not_a_terminal(stack: Stack, tmp_path: Path) -> None:
    result = subprocess.run(command(stack, chain_file(tmp_path, scale=8)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\x1b" not in result.stderr  # no terminal control codes in a log
    for name, kind, index in (("noise", "source-noise", 1), ("enlarge", "upscale-simple", 2), ("save", "persist-disk", 3)):
        assert lines.index(f"[stage {index}] {name} ({kind}) started") < lines.index(f"[stage {index}] {name} ({kind}) finished")
    # a line per quarter of the 2048² image's 16 processing tiles (512 px), the last with its rate
    progress = [line for line in lines if line.startswith("  enlarge: ")]
    assert [p.split(",")[0] for p in progress] == [f"  enlarge: {n}/16 tiles" for n in (4, 8, 12, 16)]
    assert progress[-1].endswith(" tiles/s")
    assert "JOB_STATE_SUCCEEDED" in result.stdout and "preview" not in result.stdout


def test_bars_on_a_terminal(stack: Stack, tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "140"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(command(stack, chain_file(tmp_path)), stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    screen = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side closed
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    stdout, _ = process.communicate(timeout=120)
    reader.join(timeout=30)
    os.close(leader)
    assert process.returncode == 0
    text = screen.decode(errors="replace")
    assert "\x1b[" in text and "━" in text  # drawn bars
    assert "2. enlarge" in text and "4/4" in text and "tiles/s" in text and "eta" in text
    assert "[stage 2] enlarge (upscale-simple) finished" in text
    assert b"JOB_STATE_SUCCEEDED" in stdout


def test_preview_ends_as_the_persisted_image(stack: Stack, tmp_path: Path) -> None:
    preview = tmp_path / "preview.png"
    result = subprocess.run(command(stack, chain_file(tmp_path), "--preview", str(preview), "--preview-every", "0", "--progress", "off"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --progress off
    persisted = np.asarray(Image.open(written(result.stdout)))
    assert np.array_equal(np.asarray(Image.open(preview)), persisted)
    # written while the tiles came in (the first write starts at the first tile), then at the end
    [line] = [line for line in result.stdout.splitlines() if line.startswith("preview ")]
    assert int(line.split("(")[1].split()[0]) >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.json", "preview.png"]  # no temporary files left


def test_preview_refuses_an_unknown_type(stack: Stack, tmp_path: Path) -> None:
    result = subprocess.run(command(stack, chain_file(tmp_path), "--preview", str(tmp_path / "x.nope")), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "unknown image type '.nope'" in result.stderr
