"""Heads can never run code: allowlist unpickling on every load path, estimator checks, and no
``pickle.load`` anywhere but the one loader."""

from __future__ import annotations

import ast
import builtins
import hashlib
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

from app.core.errors import ArtifactError
from app.core.recipe import answer
from app.storage.heads import ALLOWED_GLOBALS, ARRAY_FILES, safe_unpickle, to_npy
from app.storage.registry import HeadStore, check_version, load_head, save_head
from app.storage.store import ModelStore
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


def save_pickle_only(heads: HeadStore, name: str, estimator: object, card: dict) -> None:
    """A version in the format from before ``.npy`` arrays: the pickle alone (served from the pickle)."""
    blob = pickle.dumps(estimator, protocol=5)
    sha = hashlib.sha256(blob).hexdigest()
    card = {k: v for k, v in card.items() if k not in ("arrays", "artifacts", "version", "schema", "name")}
    heads.save(name, {f"head-{sha[:12]}.pkl": blob}, {**card, "pickle": f"head-{sha[:12]}.pkl", "pickle_sha256": sha})


SPOILS = [
    (lambda e: setattr(e, "coef_", e.coef_[:, :-1]), r"coef_ has shape"),
    (lambda e: setattr(e, "coef_", np.full_like(e.coef_, np.nan)), "finite floats"),
    (lambda e: setattr(e, "intercept_", np.zeros(3, np.float32)), "intercept_ has shape"),
    (lambda e: setattr(e, "classes_", np.array([0, 1, 2])), "classes_"),
    (lambda e: setattr(e, "coef_", e.coef_.astype(np.complex64)), "not a plain number"),
    (lambda e: delattr(e, "coef_"), "not fitted"),
]


@pytest.mark.parametrize("layout", ["npy arrays", "pickle only"])
@pytest.mark.parametrize(("spoil", "match"), SPOILS)
def test_estimator_is_checked_not_just_unpickled(spoil, match: str, layout: str, fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    estimator = _fitted(fresh_tiny_store)
    spoil(estimator)
    card = {k: v for k, v in heads.get("colors").card.items() if k not in ("name", "familiarity")}
    if layout == "pickle only":
        save_pickle_only(heads, "spoiled", estimator, card)
    else:
        save_head(heads, "spoiled", estimator, card)
    with pytest.raises(ArtifactError, match=match):
        load_head(heads, "spoiled", fresh_tiny_store.extractor().feature_space)


def test_a_pickled_state_that_overrides_a_method_is_refused(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    estimator = _fitted(fresh_tiny_store)
    estimator.__dict__["predict_proba"] = np.dtype  # a state payload that replaces a method
    save_pickle_only(heads, "spoiled", estimator, heads.get("colors").card)
    with pytest.raises(ArtifactError, match="overrides its methods"):
        load_head(heads, "spoiled", fresh_tiny_store.extractor().feature_space)


def test_estimator_without_predict_proba_is_refused(fresh_tiny_store: ModelStore) -> None:
    with pytest.raises(ArtifactError, match=r"refers to builtins\.dict"):
        safe_unpickle(pickle.dumps(dict, protocol=5), "x")
    estimator = _fitted(fresh_tiny_store)
    from app.storage.heads import check_estimator

    class NoProba:
        pass

    with pytest.raises(ArtifactError, match="no predict_proba"):
        check_estimator(NoProba(), ("a", "b"), None, "x")
    check_estimator(estimator, ("blue", "red"), estimator.coef_.shape[1], "x")  # the genuine one passes


@pytest.mark.parametrize("layout", ["npy arrays", "pickle only"])
def test_oversized_artifact_is_refused_before_it_is_read(layout: str, fresh_tiny_store: ModelStore) -> None:
    from app.storage.heads import MAX_PICKLE_BYTES

    heads = fresh_tiny_store.heads
    if layout == "pickle only":
        save_pickle_only(heads, "colors", _fitted(fresh_tiny_store), heads.get("colors").card)
    version = heads.get("colors")
    path = version.folder / (version.card["pickle"] if layout == "pickle only" else "head_coef.npy")
    with path.open("r+b") as f:
        f.truncate(MAX_PICKLE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ArtifactError, match="over the limit"):
        load_head(heads, "colors")


def test_nothing_but_the_loader_unpickles() -> None:
    """``pickle.load``/``loads``/``Unpickler`` (and numpy's allow_pickle) appear only in app/storage/heads.py."""
    offenders = []
    for path in sorted((REPO / "app").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = None
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("load", "loads", "Unpickler", "_Unpickler")
                and getattr(node.value, "id", "") in ("pickle", "cPickle", "dill", "joblib")
            ):
                name = f"pickle.{node.attr}"
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module in ("pickle", "joblib", "dill")
                and any(a.name in ("load", "loads", "Unpickler", "_Unpickler") for a in node.names)
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
    assert [o for o in offenders if not o.startswith("app/storage/heads.py:")] == []
    assert any(o.startswith("app/storage/heads.py") for o in offenders), "the loader itself was not found: the scan is broken"


# --- memory safety: a head file cannot crash the loader (issue 24, item 1) ----------------------
class _Crafted:
    """Pickles as the reduce tuple it is given (a callable that pickle names as a global, its args, a state)."""

    def __init__(self, *rv: object) -> None:
        self.rv = rv

    def __reduce__(self):
        return self.rv


def _crafted_array(base: np.dtype, shape: tuple[int, ...], buf: bytes) -> _Crafted:
    """``_frombuffer(buf, dtype('V8') rebuilt by BUILD as a subarray of ``base`` over ``shape``, shape, 'C')``:
    numpy's own reconstructors, only the three allowed globals, and an array that reads past its buffer."""
    from numpy._core.numeric import _frombuffer

    dtype = _Crafted(np.dtype, ("V8", False, True), (3, "|", (base, shape), None, None, 8, 1, 0))
    return _Crafted(_frombuffer, (buf, dtype, shape, "C"))


_CRAFTED = {
    # D = 512: passes every estimator check on the old loader, coef_ holds heap memory past an 8-byte buffer
    "heap read, 512-d": ("coef_", lambda: _crafted_array(np.dtype("f8"), (1, 512), b"\0" * 8), 512),
    # D = 5e7: np.isfinite walks 400 MB past the buffer (segfault on the old loader)
    "isfinite past the buffer": ("coef_", lambda: _crafted_array(np.dtype("f8"), (1, 50_000_000), b"\0" * 8), 50_000_000),
    # an object base: the buffer's bytes become a PyObject* (0x4141414141414141), dereferenced by tolist()
    "object pointer": ("classes_", lambda: _crafted_array(np.dtype("O"), (2,), b"A" * 8), None),
}

_LOAD = """
import sys
from app.core.errors import TlserveError
from app.storage.registry import load_head
from app.storage.store import ModelStore
store = ModelStore(__import__("pathlib").Path(sys.argv[1]))
try:
    head = load_head(store.heads, "crafted", store.extractor().feature_space)
except TlserveError as exc:
    print("REFUSED", exc.code, exc.message)
else:
    print("LOADED", head.estimator.coef_.shape, head.estimator.classes_.tolist())
"""


@pytest.mark.parametrize("kind", list(_CRAFTED))
def test_crafted_dtype_pickle_is_refused_not_a_crash(kind: str, fresh_tiny_store: ModelStore) -> None:
    """The issue's 636-byte pickle: only allowed globals, a dtype rebuilt through BUILD with a crafted state.
    Loaded in a subprocess, so a segfault fails this test instead of killing pytest."""
    from sklearn.linear_model import LogisticRegression

    attr, crafted, dim = _CRAFTED[kind]
    heads = fresh_tiny_store.heads
    genuine = heads.get("colors")
    estimator = LogisticRegression()
    d = dim or int(genuine.card["extractor"]["feature_dim"])
    estimator.__dict__.update(coef_=np.zeros((1, d)), intercept_=np.zeros(1), classes_=np.arange(2), n_features_in_=d)
    estimator.__dict__[attr] = crafted()
    blob = pickle.dumps(estimator, protocol=5)
    used = {(op.arg.split(" ")[0], op.arg.split(" ")[1]) for op in _globals(blob)}
    assert used <= ALLOWED_GLOBALS, used  # nothing but the allowlist: the old loader resolved every global
    # the attacker writes a consistent card: the pickle's sha256, and the feature size the crafted array claims
    card = {k: v for k, v in genuine.card.items() if k not in ("name", "familiarity", "artifacts", "version", "schema", "arrays")}
    card = {**card, "pickle": "head-crafted.pkl", "pickle_sha256": __import__("hashlib").sha256(blob).hexdigest(),
            "extractor": {**card["extractor"], "feature_dim": d}}  # fmt: skip
    heads.save("crafted", {"head-crafted.pkl": blob}, card)
    r = subprocess.run([sys.executable, "-c", _LOAD, str(fresh_tiny_store.root)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert r.returncode == 0, f"{kind}: the loader died with status {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.startswith("REFUSED artifact_error"), f"{kind}: {r.stdout[:300]}"
    assert "dtype" in r.stdout, r.stdout


def test_crafted_dtype_state_on_a_plain_name_is_refused(fresh_tiny_store: ModelStore) -> None:
    """The plain name passes, but BUILD hands the dtype another state than its own: never applied."""
    state = (3, "<", (np.dtype("f8"), (1, 8)), None, None, 8, 1, 0)
    crafted = _Crafted(__import__("numpy._core.numeric", fromlist=["_frombuffer"])._frombuffer,
                       (b"\0" * 8, _Crafted(np.dtype, ("f8", False, True), state), (1, 1), "C"))  # fmt: skip
    with pytest.raises(ArtifactError, match=r"rebuilds numpy\.dtype\('<f8'\) with the state"):
        safe_unpickle(pickle.dumps({"coef_": crafted}, protocol=5), "x")  # a dict is built by SETITEMS, not BUILD


def test_pickle_arrays_must_fill_their_buffer_exactly() -> None:
    from numpy._core.numeric import _frombuffer

    short = _Crafted(_frombuffer, (b"\0" * 8, np.dtype("f8"), (1, 2), "C"))
    with pytest.raises(ArtifactError, match=r"from 8 bytes, not 16"):
        safe_unpickle(pickle.dumps(short, protocol=5), "x")
    objects = _Crafted(_frombuffer, (b"\0" * 8, np.dtype("O"), (1,), "C"))
    with pytest.raises(ArtifactError, match=r"numpy\.dtype\('O8'\), not a plain number"):
        safe_unpickle(pickle.dumps(objects, protocol=5), "x")


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (lambda: _npy_header("|O", (2,)) + b"A" * 16, "not a plain number"),  # object pointers
        (lambda: _npy_header("<V8", (1,)) + b"\0" * 8, "not a plain number"),
        (lambda: to_npy(np.zeros(2, dtype=[("a", "<f8")])), "not a plain number"),  # structured
        (lambda: _npy_header("<f8", (1, 10**7)) + b"\0" * 8, "header declares 80000000"),  # np.load would allocate 80 MB
        (lambda: _npy_header("<f8", (1, 10**12)) + b"\0" * 8, "at most 2 sizes, each at most"),
        (lambda: _npy_header("<f8", (1, 2, 3)) + b"\0" * 48, "shape"),
        (lambda: _npy_header(">f8", (1, 1)) + b"\0" * 8, "not a plain number"),
        (lambda: b"\x93NUMPY\x01\x00" + b"\xff\xff" + b"{" * 100, "not a plain .npy"),
    ],
)
def test_crafted_npy_arrays_are_refused_before_they_are_read(data, match: str, fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    version = heads.get("colors")
    files = {f: version.read(f) for f in version.artifacts}
    files["head_coef.npy"] = data()
    card = {k: v for k, v in version.card.items() if k not in ("name", "artifacts", "version", "schema")}
    heads.save("crafted", files, card)  # a card consistent with the crafted file
    with pytest.raises(ArtifactError, match=match):
        load_head(heads, "crafted", fresh_tiny_store.extractor().feature_space)


def test_a_new_head_is_served_from_its_arrays_without_reading_its_pickle(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    version = heads.get("colors")
    assert version.card["arrays"] == ARRAY_FILES and set(ARRAY_FILES.values()) <= set(version.artifacts)
    served = load_head(heads, "colors", fresh_tiny_store.extractor().feature_space)
    genuine = pickle.loads(version.read(version.card["pickle"]))  # the test's own pickle: trusted here, never in app/
    x = np.random.default_rng(0).normal(size=(16, genuine.coef_.shape[1])).astype(np.float32)
    # the pickle is the estimator alone: its card's recipe transform and temperature make the served answer
    assert served.transform == version.card["recipe"]["transform"]
    assert served.temperature == version.card["calibration"]["temperature"]
    np.testing.assert_array_equal(served.predict_proba(x), answer(genuine, x, served.transform, served.temperature))


def test_a_new_heads_pickle_is_hashed_but_never_unpickled_to_serve(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    heads, marker = fresh_tiny_store.heads, tmp_path / "pwned"
    version = heads.get("colors")
    files = {f: version.read(f) for f in version.artifacts}
    evil = pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=5)
    files[version.card["pickle"]] = evil
    card = {k: v for k, v in version.card.items() if k not in ("name", "artifacts", "version", "schema")}
    heads.save("colors", files, {**card, "pickle_sha256": hashlib.sha256(evil).hexdigest()})  # a consistent card
    assert load_head(heads, "colors", fresh_tiny_store.extractor().feature_space).version == 2  # served from the arrays
    assert not marker.exists()
    with pytest.raises(ArtifactError, match=r"refers to posix\.system"):
        check_version(heads.get("colors"))  # what `tlserve sign` runs: the interchange pickle is checked too
    assert not marker.exists()


def test_the_committed_pickle_only_head_still_loads(real_store: ModelStore) -> None:
    version = real_store.heads.get("cats_vs_dogs")
    assert "arrays" not in version.card  # the flat head from before the arrays: served from its pickle
    head = load_head(real_store.heads, "cats_vs_dogs", real_store.extractor(verify=False).feature_space)
    genuine = pickle.loads(version.read(version.card["pickle"]))
    x = np.random.default_rng(0).normal(size=(8, 512)).astype(np.float32)
    np.testing.assert_array_equal(head.predict_proba(x), genuine.predict_proba(x).astype(np.float32))


def test_extension_codes_are_refused_even_when_registered() -> None:
    """EXT opcodes resolve through copyreg's process-wide registry and cache, past find_class."""
    import copyreg

    copyreg.add_extension("os", "system", 0x7FFF_0001)
    try:
        blob = b"\x80\x02" + b"\x84" + (0x7FFF_0001).to_bytes(4, "little") + b"."  # EXT4 → os.system
        with pytest.raises(ArtifactError, match="extension code"):
            safe_unpickle(blob, "x")
    finally:
        copyreg.remove_extension("os", "system", 0x7FFF_0001)
