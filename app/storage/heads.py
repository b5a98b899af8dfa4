"""A head: a scikit-learn logistic regression built from plain arrays, checked before it serves.

**Format.** A version written by ``tlserve train`` holds the estimator twice: ``head-<sha12>.pkl``,
the pickle, for interchange (``pickle.load`` it into scikit-learn elsewhere), and its arrays as
``.npy`` files (:data:`ARRAY_FILES`, listed in the card's ``arrays``), which is what tlserve serves:
:func:`from_arrays` reads each with ``np.load(allow_pickle=False)`` after checking its header (a plain
numeric dtype, the shape the card implies, exactly as many bytes as that shape needs) and sets them on
a fresh ``LogisticRegression``. Serving such a version never parses a pickle.

**Pickles** (heads written before the arrays existed, and every pickle ``tlserve sign`` checks) are read
by :func:`safe_unpickle` alone: the pure-Python ``Unpickler`` with two changes. ``find_class``
resolves only :data:`ALLOWED_GLOBALS`, and each to a stand-in: ``LogisticRegression`` to a placeholder
that records its state and is never a real estimator, ``numpy.dtype`` to a constructor that accepts
only the plain numeric names in :data:`PLAIN_DTYPES`, ``_frombuffer`` to a constructor that checks
that the buffer holds exactly ``shape × itemsize`` bytes. ``BUILD`` is refused except on the
placeholder (with a dict) and on a dtype whose state is that dtype's own canonical state (a no-op):
numpy's ``dtype.__setstate__``, which can make an 8-byte dtype describe gigabytes or object pointers,
is never called. From the recorded state only ``coef_``, ``intercept_``, ``classes_`` and ``C`` are
taken, onto a fresh ``LogisticRegression``, so a crafted pickle can be refused but cannot crash the
loader, read memory it does not own or run code.

**Recipe and calibration** (heads trained since issue 27): the card's ``recipe.transform`` (:mod:`app.core.recipe`:
``none`` or ``sqrt_l2``) is applied to the features before the estimator, and its ``calibration.temperature``
(:mod:`app.core.calibration`) to the probabilities after it, both by :meth:`Head.predict_proba`, so every path that
answers applies them. Both are card fields (signed with it), never code; the arrays stay a plain
``LogisticRegression``'s (a pickle loaded elsewhere answers on transformed features). A card without them (every
head trained before) answers exactly as before.

Then :func:`check_estimator` checks the estimator: coefficient shapes against the extractor's feature
size, finite values, classes in card order. Where heads live on disk and how versions work is
:mod:`app.storage.registry`'s business.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from app.core.errors import ArtifactError
from app.storage.card import Card

MAX_PICKLE_BYTES = 64 * 1024 * 1024
"""Largest head pickle or array file read (a 1,000-class head on 512-d features is about 4 MB)."""

_ESTIMATOR = ("sklearn.linear_model._logistic", "LogisticRegression")
_FROMBUFFER = frozenset({
    ("numpy._core.numeric", "_frombuffer"),  # numpy >= 2
    ("numpy.core.numeric", "_frombuffer"),  # the same function, as numpy 1.x pickles name it
})  # fmt: skip
_DTYPE = ("numpy", "dtype")
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({_ESTIMATOR, _DTYPE, *_FROMBUFFER})
"""Every global a head written by ``tlserve train`` resolves (protocol 5: arrays by ``_frombuffer``)."""

PLAIN_DTYPES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"})
"""The only dtypes a head's arrays may have (``.npy`` files and pickles): numbers, nothing that points."""

ARRAY_FILES: dict[str, str] = {"coef_": "head_coef.npy", "intercept_": "head_intercept.npy", "classes_": "head_classes.npy"}
"""The estimator's arrays as a version holds them beside its pickle (the card's ``arrays``)."""

_MAX_ARRAY_DIMS = 2


def _plain(dtype: np.dtype, where: str, what: str) -> np.dtype:
    """``dtype`` itself if it is a plain little-endian or native number (no fields, subarray, object)."""
    if (
        not isinstance(dtype, np.dtype)
        or dtype.fields is not None
        or dtype.subdtype is not None
        or dtype.hasobject
        or dtype.byteorder not in ("<", "=", "|")
        or dtype.str[1:] not in PLAIN_DTYPES
        or dtype != np.dtype(dtype.str[1:])
    ):
        raise ArtifactError(
            f"{where}: {what} has dtype {str(dtype)[:60]!r}, not a plain number ({', '.join(sorted(PLAIN_DTYPES))})"
        )
    return dtype


def _shape(shape: Any, where: str, what: str) -> tuple[int, ...]:
    if (
        type(shape) is not tuple
        or len(shape) > _MAX_ARRAY_DIMS
        or not all(type(n) is int and 0 <= n <= MAX_PICKLE_BYTES for n in shape)
    ):
        raise ArtifactError(
            f"{where}: {what} has shape {str(shape)[:60]}: a head's arrays have at most {_MAX_ARRAY_DIMS} sizes, "
            f"each at most {MAX_PICKLE_BYTES}"
        )
    return shape


# --- .npy ---------------------------------------------------------------------------------------
def to_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes, where: str, what: str, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """A plain ``.npy`` array: header read and checked first (plain numeric dtype, ``shape`` where given,
    ``None`` for any size, and exactly the bytes that shape needs), only then ``np.load(allow_pickle=False)``."""
    fp = io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        found, _fortran, dtype = read(fp)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise ArtifactError(f"{where}: {what} is not a plain .npy array ({str(exc)[:120]})") from None
    _plain(dtype, where, what)
    found = _shape(found, where, what)
    if shape is not None and (
        len(found) != len(shape) or any(e is not None and e != f for e, f in zip(shape, found, strict=False))
    ):
        raise ArtifactError(f"{where}: {what} has shape {found}, expected {tuple('D' if e is None else e for e in shape)}")
    if len(data) - fp.tell() != math.prod(found) * dtype.itemsize:
        raise ArtifactError(
            f"{where}: {what} holds {len(data) - fp.tell()} data bytes, its header declares {math.prod(found) * dtype.itemsize}"
        )
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{where}: {what} is not a plain .npy array ({str(exc)[:120]})") from None
    if not isinstance(arr, np.ndarray) or arr.shape != found or arr.dtype != dtype:
        raise ArtifactError(f"{where}: {what} does not read back as its header says")
    return arr


def estimator_files(estimator: Any) -> dict[str, bytes]:
    """The :data:`ARRAY_FILES` of a fitted estimator (none for an object without them)."""
    try:
        return {file: to_npy(np.asarray(getattr(estimator, attr))) for attr, file in ARRAY_FILES.items()}
    except (AttributeError, ValueError, TypeError):
        return {}


# --- pickles ------------------------------------------------------------------------------------
class _EstimatorState:
    """What ``LogisticRegression`` resolves to in a head pickle: its BUILD state, recorded, never applied.
    (Made by NEWOBJ, ``cls.__new__(cls)``: ``__init__`` does not run, so the default is the class's.)"""

    state: dict[str, Any] | None = None


def _dtype(name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if type(name) is not str or name not in PLAIN_DTYPES or align is not False or copy is not True:
        raise ArtifactError(
            f"pickle builds numpy.dtype({str(name)[:40]!r}), not a plain number ({', '.join(sorted(PLAIN_DTYPES))})"
        )
    return np.dtype(name)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    if type(buf) not in (bytes, bytearray):
        raise ArtifactError(f"pickle builds an array from a {type(buf).__name__}, not bytes")
    dtype = _plain(dtype, "pickle", "an array")
    shape = _shape(shape, "pickle", "an array")
    if order not in ("C", "F") or axis_order is not None:
        raise ArtifactError(f"pickle builds an array in order {str(order)[:10]!r}")
    if len(buf) != math.prod(shape) * dtype.itemsize:
        raise ArtifactError(
            f"pickle builds a {shape} {dtype} array from {len(buf)} bytes, not {math.prod(shape) * dtype.itemsize}"
        )
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


_STAND_INS: dict[tuple[str, str], Any] = {_ESTIMATOR: _EstimatorState, _DTYPE: _dtype, **{g: _frombuffer for g in _FROMBUFFER}}


class _HeadUnpickler(pickle._Unpickler):
    """See the module docstring: stand-ins for the allowed globals, BUILD only where it cannot hurt."""

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # the pure-Python Unpickler's, not in its stubs

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise ArtifactError(
                f"pickle refers to {module}.{name}, which a head may not use (allowed: LogisticRegression and numpy arrays)"
            )
        return _STAND_INS[(module, name)]

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is _EstimatorState and inst.state is None and type(state) is dict:
            inst.state = state
            return
        if isinstance(inst, np.dtype):
            own = inst.__reduce__()[2]
            if type(state) is tuple and all(type(x) in (int, str, type(None)) for x in state) and state == own:
                return  # the state a plain dtype already has: nothing to set
            raise ArtifactError(f"pickle rebuilds numpy.dtype({inst.str!r}) with the state {str(state)[:80]}, not its own {own}")
        raise ArtifactError(f"pickle sets the state of a {type(inst).__name__} (BUILD), which a head never does")

    dispatch[pickle.BUILD[0]] = load_build

    def load_ext(self) -> None:
        raise ArtifactError("pickle refers to a copyreg extension code, which a head never uses")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):  # resolved from a process-wide cache, not find_class
        dispatch[_op[0]] = load_ext
    del _op

    def persistent_load(self, pid: Any) -> Any:
        raise ArtifactError("pickle refers to a persistent object")


def safe_unpickle(blob: bytes, where: str) -> dict[str, Any]:
    """The one place tlserve unpickles: the state dict of the pickled ``LogisticRegression``."""
    if len(blob) > MAX_PICKLE_BYTES:
        raise ArtifactError(f"{where}: pickle is {len(blob)} bytes, over the limit of {MAX_PICKLE_BYTES}")
    try:
        obj = _HeadUnpickler(io.BytesIO(blob)).load()
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is one refused artifact
        raise ArtifactError(f"{where}: cannot unpickle ({type(exc).__name__})") from None
    if type(obj) is not _EstimatorState or obj.state is None:
        raise ArtifactError(f"{where}: the pickle holds a {type(obj).__name__}, not a fitted LogisticRegression")
    return obj.state


def fresh_estimator(coef: Any, intercept: Any, classes: Any, c: Any = None) -> Any:
    """A new ``LogisticRegression`` carrying these arrays (``C`` kept when it is a positive finite number)."""
    from sklearn.linear_model import LogisticRegression

    ok_c = type(c) in (float, int) and math.isfinite(c) and c > 0
    estimator = LogisticRegression(C=float(c)) if ok_c else LogisticRegression()
    estimator.coef_, estimator.intercept_, estimator.classes_ = coef, intercept, classes
    if isinstance(coef, np.ndarray) and coef.ndim == 2:
        estimator.n_features_in_ = coef.shape[1]
    return estimator


def from_pickle(blob: bytes, where: str) -> Any:
    """A fresh estimator from a head pickle's arrays (see the module docstring)."""
    state = safe_unpickle(blob, where)
    shadowed = sorted(str(k) for k in state if callable(getattr(_estimator_class(), str(k), None)))
    if shadowed:  # a state payload that replaces a method with something else
        raise ArtifactError(f"{where}: the estimator's state overrides its methods {shadowed[:5]}")
    missing = [a for a in ARRAY_FILES if a not in state]
    if missing:
        raise ArtifactError(f"{where}: the estimator is not fitted ({missing[0]} missing)")
    arrays = [state[a] for a in ARRAY_FILES]
    for attr, arr in zip(ARRAY_FILES, arrays, strict=True):
        if type(arr) is not np.ndarray:
            raise ArtifactError(f"{where}: the estimator's {attr} is a {type(arr).__name__}, not an array")
    coef, intercept, classes = arrays
    return fresh_estimator(coef, intercept, classes, c=state.get("C"))


def from_arrays(files: dict[str, bytes], where: str, c: Any = None) -> Any:
    """A fresh estimator from a version's :data:`ARRAY_FILES` (bytes by file name): each header checked
    (plain numbers, the right number of dimensions, exactly the bytes its shape needs) before it is read."""
    ndims: dict[str, tuple[None, ...]] = {"coef_": (None, None), "intercept_": (None,), "classes_": (None,)}
    coef, intercept, classes = (
        from_npy(files[file], where, f"{attr} ({file})", ndims[attr]) for attr, file in ARRAY_FILES.items()
    )
    return fresh_estimator(
        coef, intercept, classes, c=c
    )  # the sizes: check_estimator, against the card's classes and feature size


def _estimator_class() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression


@dataclass(frozen=True)
class Head:
    name: str
    version: int
    classes: tuple[str, ...]
    estimator: Any
    card: dict[str, Any]  # as written and verified (what a signature covers)
    info: Card | None = None  # the same card, typed (set by build_head)
    transform: str = "none"  # the card's recipe.transform (app.core.recipe.transform), applied before the estimator
    temperature: float = 1.0  # the card's calibration.temperature (app.core.calibration), applied to its probabilities

    @property
    def sha256(self) -> str:
        return self.info.pickle_sha256 if self.info is not None else str(self.card.get("pickle_sha256", ""))

    @property
    def familiarity(self) -> dict[str, Any] | None:
        """The card's familiarity section (:mod:`app.serving.familiarity` reads it); None: trained before it existed."""
        return self.info.familiarity if self.info is not None else None

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``[N, D]`` features → ``[N, classes]`` probabilities, columns in ``classes`` order: the card's feature
        transform, the estimator, the card's temperature. A head without a recipe or calibration in its card
        (trained before them) answers exactly as before: the estimator on the features as they are."""
        from app.core.recipe import answer

        return answer(self.estimator, features, self.transform, self.temperature)


def check_estimator(estimator: Any, classes: tuple[str, ...], feature_dim: int | None, where: str) -> None:
    """A fitted linear classifier over ``feature_dim`` features with ``len(classes)`` outputs in card order."""
    if not callable(getattr(estimator, "predict_proba", None)):
        raise ArtifactError(f"{where}: the estimator ({type(estimator).__name__}) has no predict_proba")
    shadowed = sorted(k for k in vars(estimator) if callable(getattr(type(estimator), k, None)))
    if shadowed:  # a state payload that replaces a method with something else
        raise ArtifactError(f"{where}: the estimator's state overrides its methods {shadowed[:5]}")
    n = len(classes)
    try:
        coef = np.asarray(estimator.coef_)
        intercept = np.asarray(estimator.intercept_)
        fitted = np.asarray(estimator.classes_)
    except AttributeError as exc:
        raise ArtifactError(f"{where}: the estimator is not fitted ({exc.name} missing)") from None
    rows = 1 if n == 2 else n
    dim = coef.shape[1] if coef.ndim == 2 else -1
    if coef.ndim != 2 or coef.shape[0] != rows or (feature_dim is not None and dim != feature_dim):
        raise ArtifactError(f"{where}: coef_ has shape {coef.shape}, expected ({rows}, {feature_dim or 'D'})")
    if intercept.shape != (rows,):
        raise ArtifactError(f"{where}: intercept_ has shape {intercept.shape}, expected ({rows},)")
    for label, arr in (("coef_", coef), ("intercept_", intercept)):
        if arr.dtype.kind != "f" or not np.isfinite(arr).all():
            raise ArtifactError(f"{where}: {label} must hold finite floats")
    if fitted.shape != (n,) or fitted.dtype.kind not in "iu" or not np.array_equal(fitted, np.arange(n)):
        raise ArtifactError(f"{where}: estimator classes_ {fitted.tolist()[:10]} do not match the card's {n} classes")


def build_head(name: str, version: int, classes: tuple[str, ...], estimator: Any, card: dict[str, Any],
               feature_dim: int | None) -> Head:  # fmt: skip
    """A :class:`Head` around an estimator from :func:`from_arrays` or :func:`from_pickle`, once it passes
    :func:`check_estimator`."""
    where = f"head {name!r} version {version}"
    check_estimator(estimator, classes, feature_dim, where)
    from app.core.calibration import temperature_of
    from app.core.recipe import transform_of

    return Head(name=name, version=version, classes=classes, estimator=estimator, card=card, info=Card.parse(card, where),
                transform=transform_of(card, where), temperature=temperature_of(card, where))  # fmt: skip


def dump_estimator(estimator: Any) -> bytes:
    return pickle.dumps(estimator, protocol=5)


def describe(head: Head, proba: np.ndarray, top_k: int | None = None) -> dict[str, Any]:
    """One image's result: ``label``, ``confidence`` and all ``probabilities`` or the ``top_k`` list."""
    order = np.argsort(-proba, kind="stable")
    best = int(order[0])
    out: dict[str, Any] = {"label": head.classes[best], "confidence": round(float(proba[best]), 6)}
    if top_k:
        out["top_k"] = [{"label": head.classes[i], "probability": round(float(proba[i]), 6)} for i in order[:top_k]]
    else:
        out["probabilities"] = {c: round(float(p), 6) for c, p in zip(head.classes, proba, strict=True)}
    return out
