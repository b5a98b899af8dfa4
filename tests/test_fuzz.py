"""Fuzzing: schemathesis against the real server's own OpenAPI, hypothesis against the image loader.

Bounded for CI; turn it up for a longer run::

    TLSERVE_FUZZ_EXAMPLES=200 TLSERVE_FUZZ_LOADER_INPUTS=20000 .venv/bin/pytest -s tests/test_fuzz.py

- every schemathesis case: no 5xx, the status is documented, and the body matches the documented
  schema for that status (``checks`` below);
- every loader input (random bytes, and real PNG/JPEG/GIF/BMP/TIFF/WEBP files with flipped, inserted,
  deleted and truncated bytes, and patched dimensions): only the loader's documented exceptions escape.

Counts run are printed (``-s``) at the end of the module.

The schemathesis cases come from each operation's hypothesis strategy (``as_strategy``), one pytest
test per operation and generation mode: schemathesis 4's lazy ``pytest.from_fixture`` loader needs
a pytest internal (``Node._nodeid``) that pytest 9 no longer has.
"""

from __future__ import annotations

import io
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import BaseSchema, Case, GenerationMode, Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.core.errors import EmptyInput, ImageDecodeError, ImageTooLarge, UnsupportedFormat
from app.core.imaging import load_image
from app.core.settings import Settings
from app.main import create_app
from app.storage.store import ModelStore
from tests.helpers import ServerProcess, image_bytes

API_EXAMPLES = int(os.environ.get("TLSERVE_FUZZ_EXAMPLES", "60"))
LOADER_INPUTS = int(os.environ.get("TLSERVE_FUZZ_LOADER_INPUTS", "2000"))
COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    statuses = {k[7:]: v for k, v in sorted(COUNTS.items()) if k.startswith("status:")}
    print(f"\nfuzz: {COUNTS['api']} schemathesis cases, by status {statuses}; {COUNTS['loader']} loader inputs "
          f"({COUNTS['loader:ok']} decoded, {COUNTS['loader:refused']} refused with a documented error)")  # fmt: skip


# --- schemathesis against a real server -------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    srv = module_server_factory(tiny_store, default_head="colors", max_body_bytes=2000000)
    yield srv
    assert "Traceback" not in srv.log_text(), srv.log_text()[-3000:]


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """Every (path, method) the app documents, read from the app itself at collection time; negative
    cases (data that breaks the schema) only where there is input to break (any string is a valid path
    parameter)."""
    spec = create_app(Settings(model_store=Path("/nonexistent"))).openapi()
    out = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            out.append((path, method.upper(), GenerationMode.POSITIVE))
            if op.get("requestBody") or any(p["in"] == "query" for p in op.get("parameters", [])):
                out.append((path, method.upper(), GenerationMode.NEGATIVE))
    return out


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> BaseSchema:
    """The schema as the running server serves it (its base URL is the server's)."""
    loaded = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    served = {(r.ok().path, r.ok().method.upper()) for r in loaded.get_all_operations()}
    assert served == {(path, method) for path, method, _ in OPERATIONS}
    return loaded


def not_a_server_error(ctx: object, response: Response, case: Case) -> bool:
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize(("path", "method", "mode"), OPERATIONS, ids=[f"{m} {p} {g}" for p, m, g in OPERATIONS])
def test_api_conforms_to_its_schema(api_schema: BaseSchema, path: str, method: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]
    ran = COUNTS["api"]

    @settings(max_examples=API_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        response = case.call_and_validate(checks=CHECKS, timeout=30)
        COUNTS["api"] += 1
        COUNTS[f"status:{response.status_code}"] += 1

    run()
    assert COUNTS["api"] > ran


# --- hypothesis against load_image ------------------------------------------------------------
def _seeds() -> list[bytes]:
    rgb = image_bytes((120, 60, 200), "PNG", size=(24, 20))
    out = [
        rgb,
        image_bytes((120, 60, 200), "JPEG", size=(24, 20)),
        image_bytes((1, 2, 3), "JPEG", size=(24, 20), progressive=True),
    ]
    img = Image.open(io.BytesIO(rgb))
    for fmt, mode in (
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "RGB"),
        ("WEBP", "RGB"),
        ("PNG", "LA"),
        ("PNG", "P"),
        ("TIFF", "CMYK"),
    ):
        buf = io.BytesIO()
        img.convert(mode).save(buf, format=fmt)
        out.append(buf.getvalue())
    grey16 = Image.fromarray(np.arange(24 * 20, dtype=np.uint16).reshape(20, 24) * 100)
    buf = io.BytesIO()
    grey16.save(buf, format="PNG")
    return [*out, buf.getvalue()]


SEEDS = _seeds()
MUTATION = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "set16", "set32"]), st.integers(0, 1 << 16), st.integers(0, 0xFFFFFFFF)
)


def _mutate(data: bytes, mutations: list[tuple[str, int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for op, pos, value in mutations:
        i = pos % max(len(buf), 1)
        if op == "flip" and buf:
            buf[i] ^= 1 << (value % 8)
        elif op == "insert":
            buf[i:i] = bytes([value & 0xFF]) * (1 + value % 64)
        elif op == "delete":
            del buf[i : i + 1 + value % 16]
        elif op == "set16":  # dimensions and lengths live in 16- and 32-bit fields
            buf[i : i + 2] = struct.pack(">H", value & 0xFFFF)
        elif op == "set32":
            buf[i : i + 4] = struct.pack(">I", value)
    return bytes(buf[:cut] if cut is not None else buf)


LOADER_INPUT = st.one_of(
    st.binary(max_size=2048),
    st.builds(
        lambda seed, head, tail: seed[:8] + head + tail,
        st.sampled_from(SEEDS),
        st.binary(max_size=64),
        st.binary(max_size=512),
    ),
    st.builds(
        _mutate,
        st.sampled_from(SEEDS),
        st.lists(MUTATION, min_size=1, max_size=8),
        st.one_of(st.none(), st.integers(0, 8000)),
    ),
)
DOCUMENTED = (EmptyInput, UnsupportedFormat, ImageTooLarge, ImageDecodeError)


@settings(max_examples=LOADER_INPUTS, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=LOADER_INPUT)
def test_load_image_raises_only_documented_errors(data: bytes) -> None:
    COUNTS["loader"] += 1
    try:
        out = load_image(data, 16, max_pixels=2_000_000)
    except DOCUMENTED:
        COUNTS["loader:refused"] += 1
        return
    COUNTS["loader:ok"] += 1
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_the_seeds_are_valid_images() -> None:
    """The mutations start from real files of every allowed format (else the fuzz tests nothing)."""
    for seed in SEEDS:
        assert load_image(seed, 16).shape == (16, 16, 3)
