"""The committed stubs and descriptor set are what `make protos` generates from protos/."""

from pathlib import Path

from google.protobuf import descriptor_pb2

from tilechain.protos import ROOT, descriptor_set_path, generate, generated_files


def test_stubs_are_current(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in generated_files(tmp_path)}
    committed = {p.name: p.read_bytes() for p in generated_files(ROOT)}
    assert fresh, "protoc generated nothing"
    assert descriptor_set_path(tmp_path).name in fresh, "protoc wrote no descriptor set"
    assert sorted(committed) == sorted(fresh), "generated files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: run `make protos`"


def test_descriptor_set_is_self_contained() -> None:
    """Envoy's transcoder needs every type the Gateway service uses, imports included."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path().read_bytes()).file
    names = {f.name for f in files}
    assert {"google/protobuf/struct.proto", "tilechain/v1/gateway.proto", "tilechain/v1/stage.proto", "tilechain/v1/tiles.proto"} <= names
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert "tilechain.v1.Gateway" in services


def test_every_stage_rpc_is_served() -> None:
    """The services register Stage's handlers by hand (Process through core/wire.py): each RPC
    of the proto must be among them, or callers get UNIMPLEMENTED."""
    import inspect

    from tilechain.services.core import servicer
    from tilechain.v1 import stage_pb2

    source = inspect.getsource(servicer.add_stage_servicer)
    for method in stage_pb2.DESCRIPTOR.services_by_name["Stage"].methods:
        assert f'"{method.name}":' in source, method.name
