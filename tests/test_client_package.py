"""The ``tlserve-client`` distribution (client/): its public surface, its version, the deprecated
``app.client`` alias, and its wheel installed alone in a fresh virtualenv against a live server."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tlserve_client

import app
from app.api import schemas
from app.storage.store import ModelStore
from tests.helpers import REPO, image_bytes

CLIENT = REPO / "client"
EXPORTED = {
    "AsyncClient", "Client", "ClientError",
    "ClassifyResponse", "EmbedResponse", "ModelList",
    "ImageResult", "TopK", "ItemError", "Embedding", "ModelSummary", "FamiliaritySummary",
    "__version__",
}  # fmt: skip


def pyproject(path: Path) -> dict:
    return tomllib.loads(path.read_text())


# --- the public surface (httpx's tests/test_exported_members.py pattern) ---------------------------
def test_all_is_exactly_the_public_namespace() -> None:
    public = {name for name in vars(tlserve_client) if not name.startswith("_") or name == "__version__"}
    assert len(tlserve_client.__all__) == len(set(tlserve_client.__all__))
    assert set(tlserve_client.__all__) == public  # nothing public left out of __all__, nothing leaked into it


def test_exported_members_are_the_deliberate_ones() -> None:
    assert set(tlserve_client.__all__) == EXPORTED  # adding or removing a public name is a decision: change EXPORTED
    namespace: dict[str, object] = {}
    exec("from tlserve_client import *", namespace)
    assert set(namespace) - {"__builtins__"} == EXPORTED


def test_the_server_answers_with_the_client_models() -> None:
    """One definition of the /v1 responses: the server's schemas are the client's classes."""
    for name in ("ClassifyResponse", "EmbedResponse", "ModelList", "ModelSummary"):
        assert getattr(schemas, name) is getattr(tlserve_client, name), name


# --- one version ------------------------------------------------------------------------------------
def test_one_version_for_server_and_client() -> None:
    server, client = pyproject(REPO / "pyproject.toml"), pyproject(CLIENT / "pyproject.toml")
    for project in (server, client):
        assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
        assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tlserve_client._version.__version__"}
    assert app.__version__ == tlserve_client.__version__
    assert importlib.metadata.version("tlserve") == tlserve_client.__version__  # the installed server's metadata


def test_client_depends_on_httpx_and_pydantic_only() -> None:
    deps = pyproject(CLIENT / "pyproject.toml")["project"]["dependencies"]
    assert sorted(d.split(">")[0].split("=")[0].split("[")[0].strip() for d in deps) == ["httpx", "pydantic"]
    assert not pyproject(CLIENT / "pyproject.toml")["project"].get("optional-dependencies")


# --- the deprecated alias ---------------------------------------------------------------------------
def test_app_client_is_a_deprecated_alias() -> None:
    sys.modules.pop("app.client", None)
    with pytest.warns(DeprecationWarning, match=r"app\.client is deprecated.*tlserve_client"):
        alias = importlib.import_module("app.client")
    assert alias.__all__ == tlserve_client.__all__
    assert all(getattr(alias, name) is getattr(tlserve_client, name) for name in tlserve_client.__all__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from app.client import Client, ClientError  # noqa: F401  (already imported: no second warning)


# --- the wheel, alone, in a fresh virtualenv --------------------------------------------------------
SCRIPT = """
import importlib.metadata as md, json, os, sys
result = {"prefix": sys.prefix, "base_prefix": sys.base_prefix}
for name in ("app", "tlserve", "numpy", "fastapi", "onnxruntime"):
    try:
        __import__(name)
        result[name] = "importable"
    except ModuleNotFoundError as exc:
        result[name] = type(exc).__name__
from tlserve_client import Client, ClientError
import tlserve_client
with Client(os.environ["URL"], retries=0) as tl:
    red, blue = open(os.environ["RED"], "rb").read(), open(os.environ["BLUE"], "rb").read()
    answer = tl.classify([("red.png", red), ("blue.jpg", blue)])
    result["classify"] = answer.model_dump(exclude={"request_id"})
    result["server_version"] = tl.info()["version"]
    try:
        tl.classify(red, head="no_such_head")
    except ClientError as exc:
        result["refused"] = [exc.status, exc.code]
result["version"] = tlserve_client.__version__
result["dist_version"] = md.version("tlserve-client")
result["file"] = tlserve_client.__file__
result["dists"] = sorted(d.metadata["Name"].lower() for d in md.distributions())
print(json.dumps(result))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(cmd, cwd=cwd, env=_clean_env(**env), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{cmd[:4]} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _install_client_alone(root: Path) -> Path:
    """Build the wheel from a copy of client/ alone and install it in a fresh venv; the venv's python."""
    src = shutil.copytree(CLIENT, root / "src" / "client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(src)], root)
    (wheel,) = (root / "dist").glob("tlserve_client-*.whl")
    assert wheel.name == f"tlserve_client-{app.__version__}-py3-none-any.whl"
    # No system site-packages, no pip, no tlserve: pip installs the wheel and its dependencies (from the index) into it.
    _run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], root)
    python = root / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(wheel)], root)
    return python


@pytest.mark.slow
def test_client_wheel_alone_in_a_fresh_venv_against_a_live_server(server_factory, tiny_store: ModelStore, tmp_path: Path) -> None:
    with ThreadPoolExecutor(1) as pool:  # build and install while the server starts
        installing = pool.submit(_install_client_alone, tmp_path)
        server = server_factory(tiny_store, default_head="colors")
        python = installing.result()
    venv = tmp_path / "venv"
    red, blue = tmp_path / "red.png", tmp_path / "blue.jpg"
    red.write_bytes(image_bytes((210, 40, 40), "PNG", size=(40, 36), seed=1))
    blue.write_bytes(image_bytes((40, 40, 210), "JPEG", size=(48, 40), seed=2))
    run = _run([str(python), "-c", SCRIPT], tmp_path, URL=server.url, RED=str(red), BLUE=str(blue))
    result = json.loads(run.stdout)

    assert Path(result["prefix"]).resolve() == venv.resolve() and result["prefix"] != result["base_prefix"]
    assert Path(result["file"]).resolve().is_relative_to(venv.resolve())  # the installed wheel, not the checkout
    assert {name: result[name] for name in ("app", "tlserve", "numpy", "fastapi", "onnxruntime")} == dict.fromkeys(
        ("app", "tlserve", "numpy", "fastapi", "onnxruntime"), "ModuleNotFoundError"
    )
    assert "tlserve" not in result["dists"] and {"tlserve-client", "httpx", "pydantic"} <= set(result["dists"])
    assert result["version"] == result["dist_version"] == result["server_version"] == app.__version__

    files = [
        ("files", ("red.png", red.read_bytes(), "application/octet-stream")),
        ("files", ("blue.jpg", blue.read_bytes(), "application/octet-stream")),
    ]
    raw = httpx.post(server.url + "/v1/classify", files=files, timeout=30).json()
    assert [r["label"] for r in result["classify"]["results"]] == ["red", "blue"]
    assert [{k: v for k, v in r.items() if v is not None} for r in result["classify"]["results"]] == raw["results"]
    assert result["classify"]["head"] == raw["head"] == "colors"
    assert result["refused"] == [404, "head_not_found"]
