"""The tilechain command: run services, start and stop the local stack, run chains."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if sys.argv[1:2] == ["serve"]:
    # The resamplers run many small matrix products through numpy's BLAS (OpenBLAS), which
    # gains nothing from threads at these sizes, and whose threads spin against the service's
    # own (and other processes') for the cores: 6x the CPU on a busy 2-core machine
    # (bench/RESULTS.md). One thread; set before numpy is first imported, when OpenBLAS reads it.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import grpc  # noqa: E402

from tilechain.services.core.config import FAMILIES, default_address  # noqa: E402
from tilechain.v1 import gateway_pb2  # noqa: E402


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.services import main

    main(args.family, rest)
    return 0


def _gateway(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.gateway.server import main

    main(rest)
    return 0


def _web(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.web import main

    main(rest)
    return 0


def _up(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.envoy import ADMIN_ENV, DEFAULT_ADMIN
    from tilechain.stack import WEB, StartError, up
    from tilechain.web import page_url

    try:
        stack = up(Path(args.run_dir), Path(args.log_dir), Path(args.data_dir), tuple(args.with_components))
    except (StartError, ValueError) as exc:
        print(f"error: {exc}\nstopped the components started; nothing is running", file=sys.stderr)
        return 1
    for name, address in stack.process_addresses.items():
        print(f"{name:10} {address:22} SERVING  (log: {stack.log_path(name)})")
        if name == "envoy":
            print(f"{'envoy-admin':10} {os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN:22} (loopback only; {ADMIN_ENV})")
    print(f"web page: {page_url(stack.process_addresses[WEB])}")
    return 0


def _down(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.stack import down

    stopped = down(Path(args.run_dir))
    print("stopped: " + (", ".join(stopped) or "nothing was running"))
    return 0


def _parse_inputs(values: list[str], role: str) -> list[tuple[str, str, Path]]:
    out = []
    for value in values:
        stage, sep, path = value.partition("=")
        if not sep:
            raise SystemExit(f"--{role} {value!r}: expected STAGE=FILE")
        if not Path(path).is_file():
            raise SystemExit(f"--{role} {value!r}: no such file")
        out.append((stage, role, Path(path)))
    return out


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    from tilechain.client import STREAM_ABOVE_BYTES, chain_request, connect, load_chain, submit_stream
    from tilechain.progress import PreviewWriter, display

    attachments = _parse_inputs(args.input, "image") + _parse_inputs(args.mask, "mask") + _parse_inputs(args.control, "control")
    chain = load_chain(Path(args.chain))
    if args.defaults:
        chain = with_defaults(chain, args.defaults)
    preview = PreviewWriter(args.preview, args.preview_every) if args.preview else None
    options = {
        "transport_tile": args.transport_tile,
        "decode_between_stages": args.decode_between_stages,
        "return_tiles": gateway_pb2.TILE_RETURN_FINAL if preview else gateway_pb2.TILE_RETURN_NONE,
    }
    stub = connect(args.gateway)
    shown = display(args.progress)
    status = None
    job = None
    try:
        if any(path.stat().st_size > STREAM_ABOVE_BYTES for _, _, path in attachments):
            # large files go up in chunks (SubmitChainStream), then the job is watched
            job = submit_stream(stub, chain, attachments, timeout=args.timeout, **options)
            events = stub.WatchJob(job, timeout=args.timeout)
        else:
            request = chain_request(chain, [(s, r, p.read_bytes()) for s, r, p in attachments], **options)
            events = stub.RunChain(request, timeout=args.timeout)
        for event in events:
            if shown is not None:
                shown.event(event)
            kind = event.WhichOneof("kind")
            if kind == "tile" and preview is not None:
                preview.add(event.tile)
            elif kind == "status":
                status = event.status
    except grpc.RpcError as exc:
        _cancel(stub, job)
        if shown is not None:
            shown.close()
        if preview is not None:
            preview.finish()  # what arrived before the failure
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except BaseException:  # Ctrl-C: a submitted job must not run on without us
        _cancel(stub, job)
        raise
    if shown is not None:
        shown.close()
    if preview is not None:
        preview.finish()  # the last write, with every tile
    if status is not None:
        if status.state == gateway_pb2.JOB_STATE_FAILED:  # WatchJob ends with it; RunChain raises
            code = next((c.name for c in grpc.StatusCode if c.value[0] == status.code), str(status.code))
            print(f"error: {code}: {status.message}", file=sys.stderr)
            return 1
        print(f"job {status.job_id}: {gateway_pb2.JobState.Name(status.state)}")
        for artifact in status.artifacts:
            path = artifact.uri.removeprefix("file://")
            print(f"wrote {path}  ({artifact.width}x{artifact.height} {artifact.format}, {artifact.size_bytes} bytes)")
    if preview is not None and preview.writes:
        print(f"preview {args.preview}  ({preview.writes} writes)")
    return 0 if status is not None and status.state == gateway_pb2.JOB_STATE_SUCCEEDED else 1


def _cancel(stub, job: gateway_pb2.JobRef | None) -> None:
    if job is None:
        return  # RunChain: the gateway cancels the job when the call goes away
    try:
        stub.CancelJob(job, timeout=10)
    except grpc.RpcError:
        pass


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
        response = connect(args.gateway).ListStages(gateway_pb2.ListStagesRequest(), timeout=30)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(stage_table([spec for catalog in response.catalogs for spec in catalog.stages]), end="")
    for down in response.families_down:
        print(f"down: the {down.family} service at {down.address}: {down.error}", file=sys.stderr)
    return 1 if response.families_down else 0  # the catalog printed is incomplete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilechain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run one stage-family service", add_help=False)
    p.add_argument("family", choices=FAMILIES)
    p.set_defaults(func=_serve)
    p = sub.add_parser("gateway", help="run the gateway", add_help=False)
    p.set_defaults(func=_gateway)
    p = sub.add_parser("web", help="serve the web page (and pass its API calls on to Envoy)", add_help=False)
    p.set_defaults(func=_web)

    for name, func, text in (("up", _up, "start the local stack in the background"), ("down", _down, "stop the local stack")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--run-dir", default="var/run")
        p.add_argument("--log-dir", default="var/log")
        if name == "up":
            p.add_argument("--data-dir", default="var", help="Valkey keeps its data in DATA_DIR/valkey")
            p.add_argument(
                "--with", dest="with_components", action="append", default=[], choices=("valkey",),
                help="also start Valkey (TILECHAIN_VALKEY_ADDR) and keep the gateway's jobs in it; "
                "automatic when TILECHAIN_JOB_STORE is redis:// on that address",
            )
        p.set_defaults(func=func)

    p = sub.add_parser("run", help="run a chain through the gateway")
    p.add_argument("chain", help="chain JSON file: {\"stages\": [{\"name\", \"type\", \"params\"}]}")
    p.add_argument("--input", action="append", default=[], metavar="STAGE=FILE", help="attach an image to a stage")
    p.add_argument("--mask", action="append", default=[], metavar="STAGE=FILE", help="attach a mask to a stage")
    p.add_argument("--control", action="append", default=[], metavar="STAGE=FILE", help="attach a ControlNet control image to a stage")
    p.add_argument(
        "--defaults", default="", metavar="JSON",
        help="onnx-web defaults ({\"txt2img\": {...}, \"img2img\": {...}}, or a file) that fill the stages' unset params",
    )
    p.add_argument("--gateway", default=default_address("gateway"))
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds for the whole chain")
    p.add_argument("--transport-tile", type=int, default=0, help="transport tile edge (default 512)")
    p.add_argument("--decode-between-stages", action="store_true", help="hand pixels between every two stages (no latent handoff)")
    p.add_argument(
        "--progress", choices=("auto", "bars", "plain", "off"), default="auto",
        help="on stderr: bars per stage (auto: when stderr is a terminal), plain lines otherwise",
    )
    p.add_argument("--preview", type=Path, metavar="FILE", help="write the final image to FILE as its tiles arrive (.png, .jpg, .webp)")
    p.add_argument("--preview-every", type=float, default=0.5, metavar="SECONDS", help="rewrite the preview at most this often (default 0.5)")
    p.set_defaults(func=_run)

    p = sub.add_parser("stages", help="print the stage catalog")
    p.add_argument("--gateway", default=default_address("gateway"))
    p.add_argument("--offline", action="store_true", help="from the stage classes, without the services")
    p.set_defaults(func=_stages)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("serve", "gateway", "web"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
