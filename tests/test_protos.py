"""The committed stubs are what `make protos` generates from protos/."""

from pathlib import Path

from tilechain.protos import ROOT, generate, generated_files


def test_stubs_are_current(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in generated_files(tmp_path)}
    committed = {p.name: p.read_bytes() for p in generated_files(ROOT)}
    assert fresh, "protoc generated nothing"
    assert sorted(committed) == sorted(fresh), "stub files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make protos`"
