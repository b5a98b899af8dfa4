"""Render ``tlserve.conf`` (this folder) for other upstream addresses: bare-metal hosts, the tests.

Only two things change, nothing else: the ``server tlserve:8000 ...;`` line of the upstream block is
repeated once per address with its parameters unchanged, and (optionally) the ``listen`` address.
The gRPC part (``upstream tlserve_grpc`` and its server block) is rendered the same way from
``--grpc-upstream`` (and ``--grpc-listen``), or left out when no gRPC upstream is given.

    python deploy/nginx/render.py --upstream 10.0.0.5:8000 --upstream 10.0.0.6:8000 > /etc/nginx/conf.d/tlserve.conf
    python deploy/nginx/render.py --upstream 10.0.0.5:8000 --grpc-upstream 10.0.0.5:8001 --grpc-listen 8081 > ...

``--standalone PREFIX`` instead writes a complete, unprivileged nginx setup under PREFIX (main
``nginx.conf`` with its own pid, logs and temp folders, including the rendered ``tlserve.conf``) and
prints the command that runs it in the foreground.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

CONF = Path(__file__).with_name("tlserve.conf")
COMPOSE_UPSTREAM = "tlserve:8000"
COMPOSE_LISTEN = "8080"
COMPOSE_GRPC_LISTEN = "8081"
SERVER_LINE = re.compile(r"^(?P<indent>[ \t]*)server[ \t]+tlserve:8000(?P<params>[ \t]+[^;\n]*)?;[ \t]*$", re.MULTILINE)
LISTEN_LINE = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+8080;[ \t]*$", re.MULTILINE)
GRPC_SERVER_LINE = re.compile(r"^(?P<indent>[ \t]*)server[ \t]+tlserve:8001(?P<params>[ \t]+[^;\n]*)?;[ \t]*$", re.MULTILINE)
GRPC_LISTEN_LINE = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+8081(?P<params>[ \t]+http2)?;[ \t]*$", re.MULTILINE)
GRPC_PART = re.compile(r"\n# --- gRPC: .*?\n# --- end gRPC -*\n", re.DOTALL)
ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$|^unix:/\S+$")
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _one(pattern: re.Pattern[str], text: str, what: str) -> re.Match[str]:
    found = list(pattern.finditer(text))
    if len(found) != 1:
        raise ValueError(f"{CONF.name} should hold exactly one {what} line, found {len(found)}")
    return found[0]


def _servers(pattern: re.Pattern[str], text: str, what: str, upstreams: Sequence[str]) -> str:
    server = _one(pattern, text, what)
    indent, params = server["indent"], server["params"] or ""
    lines = "\n".join(f"{indent}server {addr}{params};" for addr in upstreams)
    return text[: server.start()] + lines + text[server.end() :]


def render(
    upstreams: Sequence[str],
    listen: str | None = None,
    text: str | None = None,
    *,
    grpc_upstreams: Sequence[str] = (),
    grpc_listen: str | None = None,
) -> str:
    """``tlserve.conf`` with the upstream servers (and the listen address) replaced; the gRPC part
    rendered from ``grpc_upstreams`` (and ``grpc_listen``), or left out without them."""
    if not upstreams:
        raise ValueError("at least one upstream address is needed")
    if grpc_listen is not None and not grpc_upstreams:
        raise ValueError("--grpc-listen needs at least one --grpc-upstream")
    addresses = [*upstreams, *grpc_upstreams, *(a for a in (listen, grpc_listen) if a is not None)]
    bad = [a for a in addresses if not ADDRESS.match(a)]
    if bad:
        raise ValueError(f"not [host:]port addresses: {bad}")
    text = CONF.read_text() if text is None else text
    text = _servers(SERVER_LINE, text, "`server tlserve:8000 ...;`", upstreams)
    if listen is not None:
        match = _one(LISTEN_LINE, text, "`listen 8080;`")
        text = text[: match.start()] + f"{match['indent']}listen {listen};" + text[match.end() :]
    if not grpc_upstreams:
        return GRPC_PART.sub("", text, count=1)
    text = _servers(GRPC_SERVER_LINE, text, "`server tlserve:8001 ...;`", grpc_upstreams)
    if grpc_listen is not None:
        match = _one(GRPC_LISTEN_LINE, text, "`listen 8081 http2;`")
        text = text[: match.start()] + f"{match['indent']}listen {grpc_listen}{match['params'] or ''};" + text[match.end() :]
    return text


def main_conf(prefix: Path, server_conf: Path, *, workers: int = 2) -> str:
    """A complete nginx.conf that keeps every path under ``prefix`` (no root needed, nothing in /var)."""
    temp = "\n".join(f"    {name}_temp_path {prefix / 'temp' / name};" for name in TEMP_PATHS)
    # As root, nginx's workers would run as nobody and could not reach a private prefix.
    user = "user root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes {workers};\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} notice;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    default_type application/octet-stream;\n"
        f"{temp}\n"
        f"    include {server_conf};\n"
        "}\n"
    )


def write_standalone(
    prefix: Path,
    upstreams: Sequence[str],
    listen: str,
    *,
    workers: int = 2,
    grpc_upstreams: Sequence[str] = (),
    grpc_listen: str | None = None,
) -> Path:
    """Write ``prefix/nginx.conf`` + ``prefix/tlserve.conf``; returns the main config's path."""
    prefix = prefix.resolve()
    for name in TEMP_PATHS:
        (prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
    server_conf = prefix / "tlserve.conf"
    server_conf.write_text(render(upstreams, listen, grpc_upstreams=grpc_upstreams, grpc_listen=grpc_listen))
    main = prefix / "nginx.conf"
    main.write_text(main_conf(prefix, server_conf, workers=workers))
    return main


def command(nginx: str, main: Path, *, test: bool = False) -> list[str]:
    """The nginx command line for a standalone setup: foreground, startup errors on stderr."""
    args = [nginx, "-p", str(main.parent), "-c", str(main), "-e", "stderr"]
    return [*args, "-t"] if test else [*args, "-g", "daemon off;"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", action="append", required=True, metavar="HOST:PORT", help="a replica (repeat)")
    p.add_argument("--listen", metavar="[HOST:]PORT", help=f"listen address (default: {COMPOSE_LISTEN}, as in compose)")
    p.add_argument("--grpc-upstream", action="append", default=[], metavar="HOST:PORT", help="a replica's gRPC port (repeat)")
    p.add_argument("--grpc-listen", metavar="[HOST:]PORT", help=f"gRPC listen address (default: {COMPOSE_GRPC_LISTEN})")
    p.add_argument("--standalone", type=Path, metavar="PREFIX", help="write a complete nginx setup under PREFIX")
    args = p.parse_args(argv)
    grpc = {"grpc_upstreams": args.grpc_upstream, "grpc_listen": args.grpc_listen}
    try:
        if args.standalone:
            conf = write_standalone(args.standalone, args.upstream, args.listen or COMPOSE_LISTEN, **grpc)
            print(" ".join(f"'{a}'" if " " in a else a for a in command("nginx", conf)))
        else:
            sys.stdout.write(render(args.upstream, args.listen, **grpc))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
