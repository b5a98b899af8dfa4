"""Ed25519 signatures over head cards: trust that a replica cannot forge.

The card's ``artifacts`` map holds the sha256 of every file of a version (pickle, plots, arrays), so
a signature over the card's canonical JSON covers the whole version. Keys:

- ``TLSERVE_HEAD_SIGNING_KEY``: the private key (a PEM file's path, or the PEM itself), only where
  heads are trained; every version written there is signed.
- ``TLSERVE_HEAD_VERIFY_KEYS``: public keys (comma-separated; each the base64 of the raw 32 bytes,
  as ``tlserve keys`` prints it, or a PEM file's path), on serving replicas. With any set, a head
  that is unsigned, signed by another key or tampered with is refused with ``head_untrusted``.
  Rotation: add the new public key, re-train or re-sign (``tlserve sign``), then drop the old key.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from app.core.errors import ArtifactError, UntrustedHead
from app.core.hashing import sha256_bytes

SIGNATURE = "signature"
ALGORITHM = "ed25519"


def canonical(card: dict[str, Any]) -> bytes:
    """The bytes that are signed: the card without its signature, keys sorted, no whitespace."""
    body = {k: v for k, v in card.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return sha256_bytes(public_raw(key))[:16]


def _text(value: str) -> bytes:
    value = value.strip()
    if value.startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"signing key file {value[:80]!r} is unreadable ({type(exc).__name__})") from None


def load_private_key(value: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_text(value), password=None)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"TLSERVE_HEAD_SIGNING_KEY is not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactError("TLSERVE_HEAD_SIGNING_KEY must be an Ed25519 key")
    return key


def load_public_key(value: str) -> Ed25519PublicKey:
    value = value.strip()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return Ed25519PublicKey.from_public_bytes(raw)
    if not value.startswith("-----BEGIN") and not Path(value).is_file():
        raise ArtifactError(f"verify key {value[:40]!r} is neither base64 of 32 raw bytes nor a PEM file")
    try:
        key = serialization.load_pem_public_key(_text(value))
    except ValueError as exc:
        raise ArtifactError(f"verify key {value[:40]!r} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ArtifactError(f"verify key {value[:40]!r} is not an Ed25519 key")
    return key


def load_public_keys(values: str) -> dict[str, Ed25519PublicKey]:
    keys = [load_public_key(v) for v in values.split(",") if v.strip()]
    return {key_id(k): k for k in keys}


def generate() -> tuple[bytes, str]:
    """A new key pair: the private key as PEM, the public key as base64 of its raw bytes."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, base64.b64encode(public_raw(key.public_key())).decode()


def sign(card: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    signature = key.sign(canonical(card))
    return {**card, SIGNATURE: {"alg": ALGORITHM, "key_id": key_id(key.public_key()),
                                "value": base64.b64encode(signature).decode()}}  # fmt: skip


def verify(card: dict[str, Any], keys: dict[str, Ed25519PublicKey], where: str) -> None:
    """Raise :class:`UntrustedHead` unless ``card`` is signed by one of ``keys`` (no keys: no check)."""
    if not keys:
        return
    sig = card.get(SIGNATURE)
    if not isinstance(sig, dict):
        raise UntrustedHead(f"{where} is not signed, and head verify keys are set")
    if sig.get("alg") != ALGORITHM or not isinstance(sig.get("value"), str):
        raise UntrustedHead(f"{where} has a malformed signature")
    key = keys.get(str(sig.get("key_id")))
    if key is None:
        raise UntrustedHead(f"{where} is signed by key {str(sig.get('key_id'))[:16]!r}, which is not a verify key")
    try:
        key.verify(base64.b64decode(sig["value"], validate=True), canonical(card))
    except (InvalidSignature, binascii.Error, ValueError):
        raise UntrustedHead(f"{where}: its signature does not match its card (tampered with)") from None
