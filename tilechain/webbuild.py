"""Building the web page's client (`make web`; needs Node.js and web/node_modules from `npm ci`):

1. web/gen/: the TypeScript client generated from the committed descriptor set
   (tilechain/v1/tilechain_descriptor.binpb, which `make protos` builds from protos/) by
   protoc-gen-es, with the descriptor set's sha256 recorded in web/gen/manifest.json;
2. a type check of web/src and web/gen (tsc);
3. web/static/app.js: web/src bundled with the runtime (protobuf-es, Connect-ES) and minified by
   esbuild, its first line recording the sha256 of every input.

Both outputs are committed, so a fresh clone serves the page without npm; tests/test_web.py
compares the recorded hashes with the current inputs, so neither goes stale unnoticed."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from tilechain.protos import ROOT, descriptor_set_path

WEB = ROOT / "web"
GEN = WEB / "gen"
MANIFEST = GEN / "manifest.json"
BUNDLE = WEB / "static" / "app.js"
NODE_BIN = WEB / "node_modules" / ".bin"
# what the bundle is built from (web/gen included): a change to any of them needs `make web`
BUNDLE_INPUTS = ("src", "gen", "package.json", "package-lock.json", "tsconfig.json")
BANNER = re.compile(r"^/\*! tilechain web page: built by `make web` from sources sha256:([0-9a-f]{64}) \*/$")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def proto_files_to_generate(descriptor: Path) -> list[str]:
    """Every file in the descriptor set but the well-known types (protobuf-es ships those)."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes()).file
    return [f.name for f in files if not f.name.startswith("google/protobuf/")]


def generated_files(gen: Path = GEN) -> list[Path]:
    return sorted(gen.rglob("*_pb.ts"))


def sources_digest(web: Path = WEB) -> str:
    """sha256 over the bundle's inputs: each file's path (relative to web/) and bytes."""
    digest = hashlib.sha256()
    for name in BUNDLE_INPUTS:
        path = web / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(file.relative_to(web).as_posix().encode() + b"\0")
                digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def recorded_sources_digest(bundle: Path = BUNDLE) -> str | None:
    with bundle.open() as f:
        match = BANNER.match(f.readline().rstrip("\n"))
    return match.group(1) if match else None


def generate(gen: Path = GEN) -> None:
    descriptor = descriptor_set_path()
    from grpc_tools import protoc  # a dev dependency, as for `make protos`

    for old in generated_files(gen):
        old.unlink()
    gen.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"--descriptor_set_in={descriptor}",
        f"--plugin=protoc-gen-es={NODE_BIN / 'protoc-gen-es'}",
        f"--es_out={gen}",
        "--es_opt=target=ts",
        *proto_files_to_generate(descriptor),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc (protoc-gen-es) failed: run `npm ci` in web/ first")
    version = json.loads((WEB / "node_modules" / "@bufbuild" / "protoc-gen-es" / "package.json").read_text())["version"]
    manifest = {
        "generated_by": f"protoc-gen-es {version} (target=ts), from `make web`",
        "descriptor_set": descriptor.relative_to(ROOT).as_posix(),
        "descriptor_sha256": sha256_file(descriptor),
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def typecheck() -> None:
    subprocess.run([str(NODE_BIN / "tsc"), "-p", str(WEB)], check=True)


def bundled_packages(web: Path = WEB) -> dict[str, dict]:
    """The npm packages that end up in the bundle (not the build tools), from the lock."""
    lock = json.loads((web / "package-lock.json").read_text())
    return {path.removeprefix("node_modules/"): p for path, p in lock["packages"].items() if path and not p.get("dev")}


def bundle() -> None:
    banner = f"/*! tilechain web page: built by `make web` from sources sha256:{sources_digest()} */"
    assert BANNER.match(banner)
    packages = ", ".join(f"{name} {p['version']} ({p['license']})" for name, p in sorted(bundled_packages().items()))
    footer = f"/*! Includes {packages}; notices and licences: web/THIRD_PARTY.md */"
    subprocess.run(
        [
            str(NODE_BIN / "esbuild"), str(WEB / "src" / "main.ts"),
            "--bundle", "--minify", "--format=esm", "--target=es2022", "--charset=utf8",
            "--legal-comments=eof",  # the runtime's licence notices stay in the bundle
            f"--banner:js={banner}", f"--footer:js={footer}", f"--outfile={BUNDLE}", "--log-level=warning",
        ],
        check=True,
    )


def main() -> None:
    if not (NODE_BIN / "esbuild").exists():
        raise SystemExit("web/node_modules is missing: `make web` installs it (npm ci in web/)")
    generate()
    typecheck()
    bundle()
    print(f"wrote {GEN.relative_to(ROOT)}/ ({len(generated_files())} files) and {BUNDLE.relative_to(ROOT)} ({BUNDLE.stat().st_size} bytes)")


if __name__ == "__main__":
    sys.exit(main())
