"""The README's stage table is the one the stage classes generate."""

from pathlib import Path

from tilechain.docs import BEGIN, END, stage_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_stage_table_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert table.strip() == stage_table().strip(), "README stage table is stale: run `make docs`"


def test_the_table_says_how_each_stage_takes_its_tiles() -> None:
    """From the stage classes: a streaming stage's row says it takes tiles as they arrive (its
    max_tile means nothing), a whole-canvas stage's says so, the others give their windows."""
    rows = {line.split("|")[1].strip(" `"): line.split("|")[3].strip() for line in stage_table().splitlines()[2:]}
    assert rows["reduce-thumbnail"] == rows["persist-disk"] == "tile by tile, as they arrive"
    assert rows["source-noise"].startswith("512 px, overlap 0")
    assert rows["blend-grid"] == "whole canvas"
