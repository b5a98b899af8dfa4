"""The control plane (app/storage/control.py) and the one owner of the store tree: every product path opens the
store with its keys, and the CLI and HTTP share one set of rules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.errors import ArtifactError, VersionConflict
from app.core.settings import Settings
from app.storage.card import Card
from app.storage.control import HeadControl
from app.storage.registry import CARD, HeadKeys, HeadStore
from app.storage.store import ModelStore
from tests.helpers import REPO

OWNERS = {"app/storage/store.py", "app/storage/registry.py"}


def _constructor_calls(name: str) -> list[str]:
    found = []
    for path in sorted((REPO / "app").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name:
                found.append(f"{rel}:{node.lineno}")
    return [f for f in found if f.split(":")[0] not in OWNERS]


def test_product_code_builds_stores_only_through_model_store_open() -> None:
    """``ModelStore(...)`` or ``HeadStore(...)`` by hand would read heads without the configured verify keys
    (the INT8 gate once did); product code calls ``ModelStore.open(settings)``."""
    assert _constructor_calls("ModelStore") == []
    assert _constructor_calls("HeadStore") == []


def test_open_carries_the_configured_keys_and_spool(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "--out", str(key)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "TLSERVE_MODEL_STORE": str(tmp_path)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    public = out.stdout.split("public key:")[1].split()[0]
    settings = Settings(model_store=tmp_path, head_signing_key=str(key), head_verify_keys=public,
                        spool_dir=tmp_path / "spool")  # fmt: skip
    heads = ModelStore.open(settings).heads
    assert heads.signing_key is not None and len(heads.verify_keys) == 1
    assert heads.spool == tmp_path / "spool" and heads.root == tmp_path / "heads"
    assert heads.jobs_dir == tmp_path / "heads" / ".jobs" and heads.examples_dir("a") == tmp_path / "heads" / "a" / "examples"
    assert ModelStore(tmp_path).heads.verify_keys == {}  # a store built by hand (tools, tests) says so: no keys


def test_the_default_head_cannot_be_deleted_from_the_cli_either(fresh_tiny_store: ModelStore) -> None:
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(fresh_tiny_store.root), "TLSERVE_DEFAULT_HEAD": "colors"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "heads", "delete", "colors", "--yes"],
                          capture_output=True, text=True, cwd=REPO, env=env)  # fmt: skip
    assert proc.returncode != 0 and "is the default head" in proc.stderr
    assert fresh_tiny_store.heads.versions("colors") == [1]


def test_listing_leaves_out_a_version_whose_card_does_not_parse(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    control = HeadControl(heads, "colors")
    source = heads.get("colors")
    v2 = heads.save("colors", {f: source.read(f) for f in source.artifacts},
                    {k: v for k, v in source.card.items() if k not in ("schema", "name", "version", "artifacts")})  # fmt: skip
    (v2.folder / CARD).write_text(json.dumps({**v2.card, "classes": 7}))
    listing = control.listing("colors")
    assert listing.current == 2 and [v.version for v in listing.versions] == [1]


def test_control_rolls_back_and_names_a_store_it_cannot_write(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    control = HeadControl(heads, "colors")
    source = heads.get("colors")
    heads.save("colors", {f: source.read(f) for f in source.artifacts},
               {k: v for k, v in source.card.items() if k not in ("schema", "name", "version", "artifacts")})  # fmt: skip
    assert control.rollback("colors") == 1 and heads.current_version("colors") == 1
    with pytest.raises(VersionConflict):
        control.promote("colors", 2, expected=2)
    if os.geteuid() == 0:
        return  # root writes through read-only modes; the rest needs an unprivileged user
    folder = heads.folder("colors")
    folder.chmod(0o500)
    try:
        with pytest.raises(ArtifactError, match="not writable"):
            control.promote("colors", 2)
    finally:
        folder.chmod(0o700)


def test_card_keeps_fields_it_does_not_type_and_types_the_ones_it_reads(tiny_store: ModelStore) -> None:
    raw = tiny_store.heads.get("colors").card
    card = Card.parse({**raw, "written_by_a_newer_tlserve": {"x": 1}}, "test")
    assert card.model_dump(by_alias=True, exclude_unset=True)["written_by_a_newer_tlserve"] == {"x": 1}
    assert card.classes == ("blue", "red") and card.extractor.sha256 == raw["extractor"]["sha256"]
    assert card.accuracy == raw["metrics"]["accuracy"] and card.training.n_train == sum(
        raw["training"]["train_per_class"].values()
    )
    assert HeadStore(tiny_store.heads_dir, HeadKeys()).get("colors").info == Card.parse(raw, "test")
