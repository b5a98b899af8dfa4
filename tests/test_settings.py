"""One config object: documented, validated, and listed in the docs' settings reference."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import ValidationError

from app.core.cpus import available_cpus
from app.core.settings import Settings, settings_markdown
from app.storage.store import ModelStore
from tests.helpers import REPO


def test_every_setting_is_documented_and_in_the_settings_reference() -> None:
    # docs/reference/settings.md includes this fragment; `python -m docs.gen` writes it from settings_markdown()
    table = (REPO / "docs" / "_generated" / "settings.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert f"`TLSERVE_{name.upper()}`" in table, f"the settings reference lacks TLSERVE_{name.upper()}"
    assert settings_markdown().count("| `TLSERVE_") == len(Settings.model_fields)
    assert settings_markdown() in table, "the settings reference is stale: run `python -m docs.gen`"
    assert "{include} ../_generated/settings.md" in (REPO / "docs" / "reference" / "settings.md").read_text()


def test_env_vars_are_read_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TLSERVE_ALLOWED_FORMATS", "jpeg, png")
    s = Settings()
    assert s.max_batch_size == 7 and s.formats == frozenset({"JPEG", "PNG"})
    monkeypatch.setenv("TLSERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("TLSERVE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("TLSERVE_PROVIDER", "tpu")
    with pytest.raises(ValidationError):
        Settings()


def test_threads_default_to_the_cpus_this_process_may_use() -> None:
    n = available_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert Settings().threads == n and Settings(intra_op_threads=3).threads == 3
    assert Settings(intra_op_threads=3).decoders == 3 and Settings(decode_threads=1).decoders == 1


def test_require_gpu_on_a_cpu_machine_is_not_ready(server_factory, tiny_store: ModelStore) -> None:
    srv = server_factory(tiny_store, wait_ready=False, require_gpu="true", default_head="colors")
    srv.wait("/livez", 60)
    for _ in range(200):
        r = httpx.get(f"{srv.url}/readyz")
        if "require_gpu" in r.text:
            break
        time.sleep(0.05)
    assert r.status_code == 503 and "require_gpu" in r.json()["reason"]
    assert httpx.get(f"{srv.url}/livez").status_code == 200
    err = httpx.post(f"{srv.url}/v1/classify", content=b"x", headers={"content-type": "image/png"})
    assert err.status_code == 503 and err.json()["error"]["code"] == "not_ready"


def test_one_port_for_both_fronts_is_refused_by_settings_and_by_serve(tiny_store: ModelStore) -> None:
    with pytest.raises(ValidationError, match="grpc_port and port are both 8123"):
        Settings(port=8123, grpc_port=8123)
    # `tlserve serve --port` sets the HTTP port after the settings were read: the same check, the same words
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(tiny_store.root), "TLSERVE_GRPC_PORT": "8124", "TLSERVE_LOG_FORMAT": "text"}
    out = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "8124"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "grpc_port and port are both 8124" in out.stderr + out.stdout


def _loaded_by(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``module`` (nothing imported before it)."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.split())


def test_settings_import_nothing_of_ours_but_the_cpu_count_leaf() -> None:
    ours = {m for m in _loaded_by("app.core.settings") if m == "app" or m.startswith("app.")}
    assert ours == {
        "app",
        "app.core",
        "app.core.settings",
        "app.core.cpus",
    }  # app.core.cpus itself imports only the standard library
    assert {m for m in _loaded_by("app.core.cpus") if m.startswith("app.")} == {"app.core", "app.core.cpus"}


def test_uploads_know_no_http() -> None:
    loaded = _loaded_by("app.learning.uploads")
    assert not {m for m in loaded if m.split(".")[0] in ("starlette", "fastapi") or m.startswith("app.api")}
