"""``tlserve keys`` (a signing key pair, or an env file of API and admin keys) and ``tlserve sign`` (sign a head)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    """``tlserve keys`` and ``tlserve sign``."""
    k = sub.add_parser("keys", help="make an Ed25519 key pair for signing heads (private key file, public key printed), "
                       "or with --env an env file of fresh API and admin keys")  # fmt: skip
    k.add_argument("--out", type=Path, default=Path("head-signing-key.pem"),
                   help="where to write the private key (mode 0600, never over a file; the default name is git-ignored)")  # fmt: skip
    k.add_argument("--env", type=Path, metavar="FILE",
                   help="write TLSERVE_API_KEYS and TLSERVE_ADMIN_KEYS (fresh random keys) to FILE instead, mode 0600 "
                        "(`tlserve keys --env tlserve.env` is the file docker-compose.yml reads)")  # fmt: skip
    k.set_defaults(func=_keys)

    n = sub.add_parser("sign", help="sign a head: its version checked, then copied as a new, signed, current version")
    n.add_argument("name", help="head name")
    n.add_argument("--version", type=int, default=None, help="version to sign (default: the current one)")
    n.set_defaults(func=_sign)


def _write_secret(path: Path, data: bytes) -> bool:
    """Create ``path`` with mode 0600 (never over an existing file); False, said on stderr, when it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"error: {path} exists; refusing to overwrite a secret (move it away first)", file=sys.stderr)
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _keys(args: argparse.Namespace) -> int:
    import secrets

    from app.core.signing import generate

    if args.env is not None:  # compose's env_file (docker-compose.yml), a k8s Secret's --from-env-file
        api, admin = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        text = (f"# tlserve keys, made by `tlserve keys --env {args.env}`: keep this file private (mode 0600)\n"
                f"TLSERVE_API_KEYS={api}\nTLSERVE_ADMIN_KEYS={admin}\n")  # fmt: skip
        if not _write_secret(args.env, text.encode()):
            return 2
        print(f"API and admin keys: {args.env} (mode 0600; docker compose reads it, see deploy/README.md)")
        return 0
    pem, public = generate()
    if not _write_secret(args.out, pem):
        return 2
    print(f"private key: {args.out} (set TLSERVE_HEAD_SIGNING_KEY={args.out} where heads are trained)")
    print(f"public key:  {public} (add it to TLSERVE_HEAD_VERIFY_KEYS on serving replicas)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from app.cli.heads import control

    heads = control()
    if heads.heads.signing_key is None:
        print("error: set TLSERVE_HEAD_SIGNING_KEY to the private key that should sign the head", file=sys.stderr)
        return 2
    new = heads.sign(args.name, args.version)  # check_version first: nothing unchecked is signed
    print(f"head {args.name!r}: version {new.info.copied_from} checked (card in its folder, every file's sha256, "
          f"its pickle unpickled safely and equal to its arrays, the estimator) and signed as version {new.version} "
          "(now current)")  # fmt: skip
    return 0
