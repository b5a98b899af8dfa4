"""Render ``tlserve.conf`` (this folder) for other upstream addresses: bare-metal hosts, the tests.

Only two things change, nothing else: the ``server tlserve:8000 ...;`` line of the upstream block is
repeated once per address with its parameters unchanged, and (optionally) the ``listen`` address.

    python deploy/nginx/render.py --upstream 10.0.0.5:8000 --upstream 10.0.0.6:8000 > /etc/nginx/conf.d/tlserve.conf

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
SERVER_LINE = re.compile(r"^(?P<indent>[ \t]*)server[ \t]+tlserve:8000(?P<params>[ \t]+[^;\n]*)?;[ \t]*$", re.MULTILINE)
LISTEN_LINE = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+8080;[ \t]*$", re.MULTILINE)
ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$|^unix:/\S+$")
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _one(pattern: re.Pattern[str], text: str, what: str) -> re.Match[str]:
    found = list(pattern.finditer(text))
    if len(found) != 1:
        raise ValueError(f"{CONF.name} should hold exactly one {what} line, found {len(found)}")
    return found[0]


def render(upstreams: Sequence[str], listen: str | None = None, text: str | None = None) -> str:
    """``tlserve.conf`` with the upstream servers (and the listen address) replaced."""
    if not upstreams:
        raise ValueError("at least one upstream address is needed")
    bad = [a for a in [*upstreams, *([listen] if listen is not None else [])] if not ADDRESS.match(a)]
    if bad:
        raise ValueError(f"not [host:]port addresses: {bad}")
    text = CONF.read_text() if text is None else text
    server = _one(SERVER_LINE, text, "`server tlserve:8000 ...;`")
    indent, params = server["indent"], server["params"] or ""
    lines = "\n".join(f"{indent}server {addr}{params};" for addr in upstreams)
    text = text[: server.start()] + lines + text[server.end() :]
    if listen is not None:
        match = _one(LISTEN_LINE, text, "`listen 8080;`")
        text = text[: match.start()] + f"{match['indent']}listen {listen};" + text[match.end() :]
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


def write_standalone(prefix: Path, upstreams: Sequence[str], listen: str, *, workers: int = 2) -> Path:
    """Write ``prefix/nginx.conf`` + ``prefix/tlserve.conf``; returns the main config's path."""
    prefix = prefix.resolve()
    for name in TEMP_PATHS:
        (prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
    server_conf = prefix / "tlserve.conf"
    server_conf.write_text(render(upstreams, listen))
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
    p.add_argument("--standalone", type=Path, metavar="PREFIX", help="write a complete nginx setup under PREFIX")
    args = p.parse_args(argv)
    try:
        if args.standalone:
            conf = write_standalone(args.standalone, args.upstream, args.listen or COMPOSE_LISTEN)
            print(" ".join(f"'{a}'" if " " in a else a for a in command("nginx", conf)))
        else:
            sys.stdout.write(render(args.upstream, args.listen))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
