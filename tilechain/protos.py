"""Generating the Python stubs and the descriptor set from protos/ (`make protos`, which also
refreshes k8s/base/envoy.yaml, where the descriptor set is embedded); the tests regenerate them
into a temporary folder and compare, so committed files never go stale.

The descriptor set (every tilechain.v1 file plus its imports) is what Envoy's gRPC-JSON
transcoder reads to turn JSON into protobuf and back; it lives in the package, next to the
stubs, so that tilechain.envoy finds it wherever tilechain is installed."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "tilechain" / "v1").glob("*.proto"))


DESCRIPTOR_SET = Path("tilechain") / "v1" / "tilechain_descriptor.binpb"


def descriptor_set_path(out_dir: Path = ROOT) -> Path:
    return out_dir / DESCRIPTOR_SET


def generated_files(out_dir: Path) -> list[Path]:
    stubs = sorted(p for p in (out_dir / "tilechain" / "v1").glob("*_pb2*.py*"))
    descriptor = descriptor_set_path(out_dir)
    return stubs + ([descriptor] if descriptor.exists() else [])


def googleapis_include() -> Path:
    """Where googleapis-common-protos keeps google/api/annotations.proto (the REST routes'
    google.api.http option): the folder that holds its `google` package."""
    import google.api.annotations_pb2 as annotations

    return Path(annotations.__file__).resolve().parents[2]


def generate(out_dir: Path = ROOT) -> None:
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"-I{googleapis_include()}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        "--include_imports",
        f"--descriptor_set_out={descriptor_set_path(out_dir)}",
        *(str(p.relative_to(PROTO_DIR)) for p in proto_files()),
    ]
    (out_dir / "tilechain" / "v1").mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    generate(out)
    if out == ROOT:
        from tilechain.envoy import write_k8s_config

        write_k8s_config()  # it embeds the descriptor set
