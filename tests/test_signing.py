"""Optional Ed25519 signing of heads: signed / unsigned / other key / tampered, on every load path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.core.errors import ArtifactError, MisplacedHead, UntrustedHead
from app.core.settings import Settings
from app.core.signing import generate, load_private_key, load_public_keys, sign
from app.storage.heads import ARRAY_FILES
from app.storage.registry import CARD, HeadKeys, HeadStore, copy_version, load_head
from app.storage.store import ModelStore
from tests.helpers import ADMIN, REPO, ServerProcess, image_bytes

RED = image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Two key pairs made by `tlserve keys`: (private key file, public key)."""
    out = {}
    for name in ("trainer", "other"):
        path = tmp_path_factory.mktemp("keys") / f"{name}.pem"
        r = cli("keys", "--out", str(path))
        assert r.returncode == 0, r.stderr
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        public = r.stdout.split("public key:")[1].split()[0]
        out[name] = (path, public)
    assert cli("keys", "--out", str(out["trainer"][0])).returncode == 2  # never overwrites a private key
    return out


def signed_store(store: ModelStore, key: Path) -> HeadStore:
    heads = HeadStore(store.heads_dir, HeadKeys(signing=load_private_key(str(key))))
    copy_version(heads, "colors")  # version 2: version 1 signed
    return heads


def test_signed_unsigned_other_key_and_tampered(fresh_tiny_store: ModelStore, keys) -> None:
    store = fresh_tiny_store
    space = store.extractor().feature_space
    signed_store(store, keys["trainer"][0])
    trusted = HeadStore(store.heads_dir, HeadKeys(verify=load_public_keys(keys["trainer"][1])))
    assert load_head(trusted, "colors", space).version == 2  # signed: served
    with pytest.raises(UntrustedHead, match="not signed"):
        load_head(trusted, "colors", space, version=1)  # the unsigned original
    other = HeadStore(store.heads_dir, HeadKeys(verify=load_public_keys(keys["other"][1])))
    with pytest.raises(UntrustedHead, match="not a verify key"):
        load_head(other, "colors", space)
    rotating = HeadStore(store.heads_dir, HeadKeys(verify=load_public_keys(f"{keys['other'][1]},{keys['trainer'][1]}")))
    assert load_head(rotating, "colors", space).version == 2  # rotation: either key is accepted
    assert load_head(store.heads, "colors", space, version=1).version == 1  # no verify keys: no check

    card_path = trusted.current_folder("colors") / CARD
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "classes": ["red", "blue"]}))  # a changed card: its signature breaks
    with pytest.raises(UntrustedHead, match="does not match"):
        load_head(trusted, "colors", space)
    card_path.write_text(json.dumps(card))
    pickle_path = trusted.current_folder("colors") / card["pickle"]
    pickle_path.write_bytes(pickle_path.read_bytes() + b"\0")  # a changed file: the signed artifacts map catches it
    with pytest.raises(ArtifactError, match="does not match its card"):
        load_head(trusted, "colors", space)


def test_signature_covers_every_artifact(fresh_tiny_store: ModelStore, keys) -> None:
    heads = signed_store(fresh_tiny_store, keys["trainer"][0])
    card = heads.get("colors").card
    assert card["signature"]["alg"] == "ed25519"
    assert set(card["artifacts"]) == {card["pickle"], "confusion_matrix.png", "reliability.png", "oof_proba.npy", "folds.json", "familiarity_bank.npy",
                                      "familiarity_labels.npy", "familiarity_center.npy", *ARRAY_FILES.values()}  # fmt: skip


def test_training_with_a_signing_key_signs(fresh_tiny_store: ModelStore, keys, tmp_path: Path) -> None:
    from app.learning.training import Trainer
    from tests.helpers import write_color_dataset

    settings = Settings(model_store=fresh_tiny_store.root, intra_op_threads=1, head_signing_key=str(keys["trainer"][0]))
    card = Trainer(settings, progress=False).train(write_color_dataset(tmp_path / "d", 6), "colors", c=1.0).card
    assert card["signature"]["key_id"] and card["version"] == 2
    trusted = HeadStore(fresh_tiny_store.heads_dir, HeadKeys(verify=load_public_keys(keys["trainer"][1])))
    assert load_head(trusted, "colors").version == 2


def test_bad_keys_are_refused_at_start_with_a_message(tmp_path: Path) -> None:
    r = cli("settings", env={"TLSERVE_HEAD_VERIFY_KEYS": "not-a-key"})
    assert r.returncode == 2 and "verify key 'not-a-key'" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    r = cli("settings", env={"TLSERVE_HEAD_SIGNING_KEY": str(bad)})
    assert r.returncode == 2 and "not a PEM private key" in r.stderr
    _pem, public = generate()
    assert load_public_keys(public)


def test_replica_with_verify_keys_serves_signed_heads_only(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess], keys
) -> None:
    store = fresh_tiny_store
    env = {"TLSERVE_MODEL_STORE": str(store.root)}
    r = cli("sign", "colors", env=env)  # a replica holds no private key: it cannot sign
    assert r.returncode == 2 and "TLSERVE_HEAD_SIGNING_KEY" in r.stderr
    r = cli("sign", "colors", env={**env, "TLSERVE_HEAD_SIGNING_KEY": str(keys["trainer"][0])})
    assert r.returncode == 0 and "signed as version 2" in r.stdout, r.stderr
    copy_version(store.heads, "colors")  # version 3: unsigned
    store.heads.promote("colors", 2)
    # an unsigned second head, in the flat layout from before versions
    (store.heads_dir / "plain").mkdir()
    plain = store.heads.get("colors", 1)
    for f in plain.artifacts:
        (store.heads_dir / "plain" / f).write_bytes(plain.read(f))
    (store.heads_dir / "plain" / CARD).write_text(
        json.dumps({k: v for k, v in plain.card.items() if k not in ("schema", "version", "artifacts", "familiarity")})
    )

    server = server_factory(store, default_head="colors", head_verify_keys=keys["trainer"][1], head_poll_interval_s="0.2")
    ok = httpx.post(f"{server.url}/v1/classify", content=RED, headers={"content-type": "image/png"})
    assert ok.status_code == 200 and ok.json()["version"] == 2
    listed = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert listed["plain"]["loaded"] is False and listed["plain"]["error_code"] == "head_untrusted"
    r = httpx.post(f"{server.url}/v1/models/plain/reload", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "head_untrusted"

    store.heads.promote("colors", 3)  # an unsigned version made current: refused, version 2 keeps serving
    deadline = time.monotonic() + 15
    while httpx.get(f"{server.url}/v1/models/colors").json().get("error") is None:
        assert time.monotonic() < deadline, "the poller never tried the unsigned version"
        time.sleep(0.1)
    r = httpx.post(f"{server.url}/v1/classify", content=RED, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["version"] == 2
    assert httpx.get(f"{server.url}/v1/models/colors").json()["error"].find("not signed") >= 0


def test_a_signed_version_copied_to_another_name_or_number_is_refused(fresh_tiny_store: ModelStore, keys) -> None:
    """Signatures bind name and version: `cp -r heads/colors/2 heads/triage/7` is not head triage v7, and an
    old signed version copied over a newer number is not that version (issue 24, item 5)."""
    store = fresh_tiny_store
    space = store.extractor().feature_space
    signed = signed_store(store, keys["trainer"][0])
    trusted = HeadStore(store.heads_dir, HeadKeys(verify=load_public_keys(keys["trainer"][1])))
    assert load_head(trusted, "colors", space).version == 2
    source = signed.version_folder("colors", 2)
    shutil.copytree(source, store.heads_dir / "triage" / "7")
    with pytest.raises(MisplacedHead, match="card is head 'colors'") as refused:
        load_head(trusted, "triage", space)
    assert refused.value.code == "head_misplaced" and refused.value.status_code == 409
    shutil.copytree(source, store.heads_dir / "colors" / "5")  # replayed as a newer version of the same head
    with pytest.raises(MisplacedHead, match="card is version 2's"):
        load_head(trusted, "colors", space, version=5)
    with pytest.raises(MisplacedHead):  # without verify keys the store checks the folder all the same
        load_head(store.heads, "triage", space)


def test_a_signature_that_does_not_cover_name_and_version_is_refused(fresh_tiny_store: ModelStore, keys) -> None:
    """tlserve has always signed name and version (they are in the card it signs); a signed card without
    them was not written by it and is refused, to be re-signed with `tlserve sign`."""
    store = fresh_tiny_store
    signed_store(store, keys["trainer"][0])
    card_path = store.heads.version_folder("colors", 2) / CARD
    card = json.loads(card_path.read_text())
    assert card["name"] == "colors" and card["version"] == 2 and "signature" in card  # what every signed card holds
    bare = {k: v for k, v in card.items() if k not in ("name", "version", "signature")}
    card_path.write_text(json.dumps(sign(bare, load_private_key(str(keys["trainer"][0])))))
    trusted = HeadStore(store.heads_dir, HeadKeys(verify=load_public_keys(keys["trainer"][1])))
    with pytest.raises(MisplacedHead, match="re-sign it with `tlserve sign`"):
        load_head(trusted, "colors", version=2)


def test_sign_checks_what_it_signs(fresh_tiny_store: ModelStore, keys, tmp_path: Path) -> None:
    """`tlserve sign` loads and checks a version before signing it: a malicious or crafted pickle with a
    consistent card is refused and nothing is written; a pickle-only head gets its .npy arrays (issue 24, item 7)."""
    import hashlib
    import pickle

    from tests.test_safe_heads import _Reduce, save_pickle_only

    store = fresh_tiny_store
    env = {"TLSERVE_MODEL_STORE": str(store.root), "TLSERVE_HEAD_SIGNING_KEY": str(keys["trainer"][0])}
    marker = tmp_path / "pwned"
    genuine = store.heads.get("colors")
    save_pickle_only(store.heads, "evil", _Reduce(os.system, f"touch {marker}"), genuine.card)
    r = cli("sign", "evil", env=env)
    assert r.returncode == 1 and "refers to posix.system" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert store.heads.versions("evil") == [1] and not marker.exists()

    # a new-format version whose interchange pickle is not what it serves (the card is consistent, unsigned)
    files = {f: genuine.read(f) for f in genuine.artifacts}
    other = load_head(store.heads, "colors").estimator
    other.coef_ = -other.coef_
    files[genuine.card["pickle"]] = blob = pickle.dumps(other, protocol=5)
    card = {k: v for k, v in genuine.card.items() if k not in ("name", "artifacts", "version", "schema")}
    store.heads.save("colors", files, {**card, "pickle_sha256": hashlib.sha256(blob).hexdigest()})
    r = cli("sign", "colors", env=env)
    assert r.returncode == 1 and "pickle's coef_ differs from head_coef.npy" in r.stderr, r.stderr
    assert store.heads.versions("colors") == [1, 2]

    # a pickle-only head (the format from before the arrays): checked, signed, and given its arrays
    save_pickle_only(store.heads, "old", load_head(store.heads, "colors", version=1).estimator, genuine.card)
    r = cli("sign", "old", env=env)
    assert r.returncode == 0 and "checked" in r.stdout and "signed as version 2" in r.stdout, r.stderr
    trusted = HeadStore(store.heads_dir, HeadKeys(verify=load_public_keys(keys["trainer"][1])))
    signed = trusted.get("old")
    assert signed.card["arrays"] == ARRAY_FILES and set(ARRAY_FILES.values()) <= set(signed.artifacts)
    assert load_head(trusted, "old", store.extractor().feature_space).version == 2
