"""Heads can never run code: allowlist unpickling on every load path, estimator checks, and no
``pickle.load`` anywhere but the one loader."""

from __future__ import annotations

import ast
import builtins
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.errors import ArtifactError
from app.heads import ALLOWED_GLOBALS, safe_unpickle
from app.registry import load_head, save_head
from app.store import ModelStore
from tests.helpers import ADMIN, REPO, ServerProcess, image_bytes

RED = image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15)


class _Reduce:
    """Pickles as ``func(*args)``: what a malicious pickle runs at load time."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _evil_estimators(marker: Path) -> dict[str, tuple[object, str]]:
    """name → (object to pickle as a head, the global that must be refused)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    touch = f"touch {marker}"
    lr_with_payload = LogisticRegression()
    lr_with_payload.__dict__["payload"] = _Reduce(os.system, touch)  # an allowed class whose state smuggles a call
    return {
        "os.system": (_Reduce(os.system, touch), "posix.system"),
        "subprocess": (_Reduce(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        "eval via builtins": (_Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        "nested reduce in a Pipeline": (
            Pipeline([("evil", _Reduce(os.system, touch)), ("lr", LogisticRegression())]),
            "sklearn.pipeline.Pipeline",
        ),
        "allowed class, malicious __setstate__ payload": (lr_with_payload, "posix.system"),
    }


def test_allowlist_is_exactly_what_the_default_head_needs(real_store: ModelStore) -> None:
    version = real_store.heads.get("cats_vs_dogs")
    blob = version.read(version.card["pickle"])
    used = {(op.arg.split(" ")[0], op.arg.split(" ")[1]) for op in _globals(blob)}
    assert used <= ALLOWED_GLOBALS
    assert used >= {("sklearn.linear_model._logistic", "LogisticRegression"), ("numpy", "dtype")}


def _globals(blob: bytes) -> list:
    import pickletools

    class Op:
        def __init__(self, arg: str) -> None:
            self.arg = arg

    out, strings = [], []
    for op, arg, _ in pickletools.genops(blob):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            out.append(Op(f"{strings[-2]} {strings[-1]}"))
        elif op.name == "GLOBAL":
            out.append(Op(arg))
    return out


@pytest.mark.parametrize("kind", list(_evil_estimators(Path("/x"))))
def test_malicious_pickle_with_a_matching_card_is_refused_before_it_runs(
    kind: str, fresh_tiny_store: ModelStore, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil, refused = _evil_estimators(marker)[kind]
    heads = fresh_tiny_store.heads
    card = {k: v for k, v in heads.get("colors").card.items() if k not in ("name", "familiarity")}
    save_head(heads, "evil", evil, card)  # its card carries the right sha256: integrity is not trust
    with pytest.raises(ArtifactError, match=re.escape(f"refers to {refused}")):
        load_head(heads, "evil", fresh_tiny_store.extractor().feature_space)
    assert not marker.exists(), f"{kind}: the pickle ran code"


def test_every_load_path_refuses_a_malicious_head_and_the_old_version_keeps_serving(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    store, heads = fresh_tiny_store, fresh_tiny_store.heads
    marker = tmp_path / "pwned"
    card = {k: v for k, v in heads.get("colors").card.items() if k not in ("name", "familiarity")}
    save_head(heads, "evil", _Reduce(os.system, f"touch {marker}"), card)

    # start-up: served heads load, the evil one is listed with its error
    server = server_factory(store, default_head="colors", head_poll_interval_s="0.2")
    listed = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert listed["evil"]["loaded"] is False and listed["evil"]["error_code"] == "artifact_error"
    assert "posix.system" in listed["evil"]["error"]
    r = httpx.post(f"{server.url}/v1/classify?head=evil", content=RED, headers={"content-type": "image/png"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "artifact_error"

    # the reload endpoint
    r = httpx.post(f"{server.url}/v1/models/evil/reload", headers=ADMIN)
    assert r.status_code == 500 and r.json()["error"]["code"] == "artifact_error"

    # the poller: a new malicious version of a served head is refused, the old version keeps serving
    save_head(heads, "colors", _Reduce(os.system, f"touch {marker}"), card)
    deadline = time.monotonic() + 15
    while "colors" not in {m["name"] for m in httpx.get(f"{server.url}/v1/models").json()["models"] if m.get("error")}:
        assert time.monotonic() < deadline, "the poller never tried the new version"
        time.sleep(0.1)
    r = httpx.post(f"{server.url}/v1/classify?head=colors", content=RED, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["results"][0]["label"] == "red"

    # the CLI
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(store.root), "TLSERVE_INTRA_OP_THREADS": "1"}
    (tmp_path / "red.png").write_bytes(RED)
    cli = subprocess.run([sys.executable, "-m", "app.cli", "predict", str(tmp_path / "red.png"), "--head", "evil"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert cli.returncode != 0 and "posix.system" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    assert not marker.exists()


def _fitted(store: ModelStore):
    return load_head(store.heads, "colors").estimator


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (lambda e: setattr(e, "coef_", e.coef_[:, :-1]), r"coef_ has shape"),
        (lambda e: setattr(e, "coef_", np.full_like(e.coef_, np.nan)), "finite floats"),
        (lambda e: setattr(e, "intercept_", np.zeros(3, np.float32)), "intercept_ has shape"),
        (lambda e: setattr(e, "classes_", np.array([0, 1, 2])), "classes_"),
        (lambda e: e.__dict__.__setitem__("predict_proba", np.dtype), "overrides its methods"),
        (lambda e: delattr(e, "coef_"), "not fitted"),
    ],
)
def test_estimator_is_checked_not_just_unpickled(spoil, match: str, fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    estimator = _fitted(fresh_tiny_store)
    spoil(estimator)
    card = {k: v for k, v in heads.get("colors").card.items() if k not in ("name", "familiarity")}
    save_head(heads, "spoiled", estimator, card)
    with pytest.raises(ArtifactError, match=match):
        load_head(heads, "spoiled", fresh_tiny_store.extractor().feature_space)


def test_estimator_without_predict_proba_is_refused(fresh_tiny_store: ModelStore) -> None:
    with pytest.raises(ArtifactError, match=r"refers to builtins\.dict"):
        safe_unpickle(pickle.dumps(dict, protocol=5), "x")
    estimator = _fitted(fresh_tiny_store)
    from app.heads import check_estimator

    class NoProba:
        pass

    with pytest.raises(ArtifactError, match="no predict_proba"):
        check_estimator(NoProba(), ("a", "b"), None, "x")
    check_estimator(estimator, ("blue", "red"), estimator.coef_.shape[1], "x")  # the genuine one passes


def test_oversized_pickle_is_refused_before_it_is_read(fresh_tiny_store: ModelStore) -> None:
    from app.heads import MAX_PICKLE_BYTES

    heads = fresh_tiny_store.heads
    version = heads.get("colors")
    path = version.folder / version.card["pickle"]
    with path.open("r+b") as f:
        f.truncate(MAX_PICKLE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ArtifactError, match="over the limit"):
        load_head(heads, "colors")


def test_nothing_but_the_loader_unpickles() -> None:
    """``pickle.load``/``loads``/``Unpickler`` (and numpy's allow_pickle) appear only in app/heads.py."""
    offenders = []
    for path in sorted((REPO / "app").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = None
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("load", "loads", "Unpickler")
                and getattr(node.value, "id", "") in ("pickle", "cPickle", "dill", "joblib")
            ):
                name = f"pickle.{node.attr}"
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module in ("pickle", "joblib", "dill")
                and any(a.name in ("load", "loads", "Unpickler") for a in node.names)
            ):
                name = f"from {node.module} import ..."
            elif (
                isinstance(node, ast.keyword)
                and node.arg == "allow_pickle"
                and not (isinstance(node.value, ast.Constant) and node.value.value is False)
            ):
                name = "allow_pickle"
            if name:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert [o for o in offenders if not o.startswith("app/heads.py:")] == []
    assert any(o.startswith("app/heads.py") for o in offenders), "the loader itself was not found: the scan is broken"
