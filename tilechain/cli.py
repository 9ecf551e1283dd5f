"""The tilechain command: run services, start and stop the local stack, run chains."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from tilechain.services.core.config import default_address
from tilechain.v1 import gateway_pb2


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.services import main

    main(args.family, rest)
    return 0


def _gateway(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.gateway.server import main

    main(rest)
    return 0


def _up(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.stack import up

    stack = up(Path(args.run_dir), Path(args.log_dir))
    for component, address in stack.addresses.items():
        print(f"{component:8} {address:22} SERVING  (log: {Path(args.log_dir) / (component + '.log')})")
    return 0


def _down(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.stack import down

    stopped = down(Path(args.run_dir))
    print("stopped: " + (", ".join(stopped) or "nothing was running"))
    return 0


def _parse_inputs(values: list[str], role: str) -> list[tuple[str, str, bytes]]:
    out = []
    for value in values:
        stage, sep, path = value.partition("=")
        if not sep:
            raise SystemExit(f"--{role} {value!r}: expected STAGE=FILE")
        out.append((stage, role, Path(path).read_bytes()))
    return out


class ProgressBar:
    """One line on stderr: the stage running, and its tiles or steps."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.stages_total = 0

    def line(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def event(self, event: gateway_pb2.JobEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "stage":
            s = event.stage
            verb = "started" if s.kind == gateway_pb2.StageEvent.KIND_STARTED else "finished"
            self.line(f"[stage {s.stage_index + 1}] {s.name} ({s.type}) {verb}", final=True)
        elif kind == "progress":
            p = event.progress.progress
            width = 30
            filled = width * p.done // max(1, p.total)
            self.line(f"  {event.progress.name}: [{'#' * filled}{'.' * (width - filled)}] {p.done}/{p.total} {p.unit}")
        elif kind == "notice":
            self.line(f"  {event.notice.name}: {event.notice.message}", final=True)


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.client import chain_request, connect, load_chain

    attachments = _parse_inputs(args.input, "image") + _parse_inputs(args.mask, "mask")
    chain = load_chain(Path(args.chain))
    if args.defaults:
        chain = with_defaults(chain, args.defaults)
    request = chain_request(chain, attachments, transport_tile=args.transport_tile, decode_between_stages=args.decode_between_stages)
    stub = connect(args.gateway)
    bar = ProgressBar()
    try:
        for event in stub.RunChain(request, timeout=args.timeout):
            bar.event(event)
            if event.WhichOneof("kind") == "status":
                status = event.status
                print(f"job {status.job_id}: {gateway_pb2.JobState.Name(status.state)}")
                for artifact in status.artifacts:
                    path = artifact.uri.removeprefix("file://")
                    print(f"wrote {path}  ({artifact.width}x{artifact.height} {artifact.format}, {artifact.size_bytes} bytes)")
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def with_defaults(chain: str, defaults: str) -> str:
    """The chain with more of onnx-web's `defaults` (JSON, or a JSON file): they fill the unset
    params of the matching stages; for a group both give, these win. The file stays as it is."""
    import json

    text = Path(defaults).read_text() if not defaults.lstrip().startswith("{") else defaults
    try:
        extra = json.loads(text)
        document = json.loads(chain)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--defaults: not valid JSON: {exc}") from None
    if not isinstance(extra, dict) or not isinstance(document, dict):
        raise SystemExit('--defaults: expected an object like {"txt2img": {"steps": 4}}')
    merged = dict(document.get("defaults") or {})
    for group, params in extra.items():
        merged[group] = {**(merged.get(group) or {}), **params}
    return json.dumps({**document, "defaults": merged})


def _stages(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.docs import stage_table

    if args.offline:
        print(stage_table(), end="")
        return 0
    from tilechain.client import connect

    try:
        catalogs = connect(args.gateway).ListStages(gateway_pb2.ListStagesRequest(), timeout=10).catalogs
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(stage_table([spec for catalog in catalogs for spec in catalog.stages]), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilechain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run one stage-family service", add_help=False)
    p.add_argument("family", choices=("source", "blend", "correct", "upscale", "persist", "reduce"))
    p.set_defaults(func=_serve)
    p = sub.add_parser("gateway", help="run the gateway", add_help=False)
    p.set_defaults(func=_gateway)

    for name, func, text in (("up", _up, "start the local stack in the background"), ("down", _down, "stop the local stack")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--run-dir", default="var/run")
        p.add_argument("--log-dir", default="var/log")
        p.set_defaults(func=func)

    p = sub.add_parser("run", help="run a chain through the gateway")
    p.add_argument("chain", help="chain JSON file: {\"stages\": [{\"name\", \"type\", \"params\"}]}")
    p.add_argument("--input", action="append", default=[], metavar="STAGE=FILE", help="attach an image to a stage")
    p.add_argument("--mask", action="append", default=[], metavar="STAGE=FILE", help="attach a mask to a stage")
    p.add_argument(
        "--defaults", default="", metavar="JSON",
        help="onnx-web defaults ({\"txt2img\": {...}, \"img2img\": {...}}, or a file) that fill the stages' unset params",
    )
    p.add_argument("--gateway", default=default_address("gateway"))
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds for the whole chain")
    p.add_argument("--transport-tile", type=int, default=0, help="transport tile edge (default 512)")
    p.add_argument("--decode-between-stages", action="store_true", help="hand pixels between every two stages (no latent handoff)")
    p.set_defaults(func=_run)

    p = sub.add_parser("stages", help="print the stage catalog")
    p.add_argument("--gateway", default=default_address("gateway"))
    p.add_argument("--offline", action="store_true", help="from the stage classes, without the services")
    p.set_defaults(func=_stages)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("serve", "gateway"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
