"""The README's stage table is the one the stage classes generate."""

from pathlib import Path

from tilechain.docs import BEGIN, END, stage_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_stage_table_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert table.strip() == stage_table().strip(), "README stage table is stale: run `make docs`"
