"""Render ``tlserve.conf`` (this folder) for other upstream addresses: bare-metal hosts, the tests.

Two things change: the ``server tlserve:8000 ...;`` line of the upstream block is repeated once per
address with its parameters unchanged, and (optionally) the ``listen`` address. The body limits are
not nginx's own: every ``client_max_body_size`` (and the 413 answer naming it) is set from the service's
``Settings`` (``TLSERVE_MAX_BODY_BYTES`` for the HTTP and gRPC servers, ``TLSERVE_MAX_TRAINING_BYTES`` for
the upload routes), read from the environment like the service reads them; the committed file holds the
defaults (``python deploy/nginx/render.py --write-defaults`` rewrites it, and a test keeps it so).
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
BODY_LIMIT = re.compile(r"(?P<head>^[ \t]*client_max_body_size[ \t]+)(?P<size>\d+[kKmMgG]?)(?P<tail>;)", re.MULTILINE)
UPLOAD_BLOCK = re.compile(r"location ~ \^/v1/heads/\[\^/\]\+/\(train\|examples\)\$ \{.*?\n    \}", re.DOTALL)
BODY_MESSAGE = re.compile(r"(body is over the load balancer limit of )\d+ MiB")
TRAINING_MESSAGE = re.compile(r"(training upload is over the load balancer limit of )\d+ MiB")


def nginx_size(n: int) -> str:
    """``n`` bytes as nginx writes a size (``64m``), exact: a size nginx cannot say exactly is an error."""
    for unit, factor in (("m", 1024**2), ("k", 1024)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    factor = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(text[-1:].lower(), 1)
    return int(text.rstrip("kKmMgG")) * factor


def body_limits(text: str) -> list[tuple[str, int]]:
    """Every ``client_max_body_size`` of ``text`` as ``(setting, bytes)``: ``max_training_bytes`` inside the upload
    routes' location, ``max_body_bytes`` everywhere else."""
    upload = UPLOAD_BLOCK.search(text)
    found = []
    for m in BODY_LIMIT.finditer(text):
        inside = upload is not None and upload.start() <= m.start() < upload.end()
        found.append(("max_training_bytes" if inside else "max_body_bytes", parse_size(m["size"])))
    return found


def apply_limits(text: str, max_body_bytes: int, max_training_bytes: int) -> str:
    """``text`` with every body limit (directives and the 413 messages naming them) set from the settings."""
    upload = UPLOAD_BLOCK.search(text)
    if upload is None or not BODY_LIMIT.search(upload[0]):
        raise ValueError(f"{CONF.name} should hold the upload routes' location with its own client_max_body_size")

    def directive(m: re.Match[str]) -> str:
        inside = upload.start() <= m.start() < upload.end()
        return f"{m['head']}{nginx_size(max_training_bytes if inside else max_body_bytes)}{m['tail']}"

    text = BODY_LIMIT.sub(directive, text)
    text = BODY_MESSAGE.sub(lambda m: f"{m[1]}{max_body_bytes // 2**20} MiB", text)
    return TRAINING_MESSAGE.sub(lambda m: f"{m[1]}{max_training_bytes // 2**20} MiB", text)


def settings_limits() -> tuple[int, int]:
    """``(max_body_bytes, max_training_bytes)`` as the service reads them (``TLSERVE_*`` variables, else defaults)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from app.core.settings import Settings

    s = Settings()
    return s.max_body_bytes, s.max_training_bytes


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
    text = apply_limits(CONF.read_text() if text is None else text, *settings_limits())
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
    p.add_argument("--upstream", action="append", default=[], metavar="HOST:PORT", help="a replica (repeat; required)")
    p.add_argument("--listen", metavar="[HOST:]PORT", help=f"listen address (default: {COMPOSE_LISTEN}, as in compose)")
    p.add_argument("--grpc-upstream", action="append", default=[], metavar="HOST:PORT", help="a replica's gRPC port (repeat)")
    p.add_argument("--grpc-listen", metavar="[HOST:]PORT", help=f"gRPC listen address (default: {COMPOSE_GRPC_LISTEN})")
    p.add_argument("--standalone", type=Path, metavar="PREFIX", help="write a complete nginx setup under PREFIX")
    p.add_argument("--write-defaults", action="store_true", help=f"rewrite {CONF.name}'s body limits from the Settings defaults")
    args = p.parse_args(argv)
    if args.write_defaults:
        from app.core.settings import Settings

        fields = Settings.model_fields
        CONF.write_text(apply_limits(CONF.read_text(), fields["max_body_bytes"].default, fields["max_training_bytes"].default))
        return 0
    if not args.upstream:
        p.error("--upstream HOST:PORT is required")
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
