"""The image's dependency locks, made from pyproject.toml: ``serve.txt`` and ``export.txt`` (this folder).

    python deploy/requirements/lock.py           # resolve on PyPI and write both files
    python deploy/requirements/lock.py --check   # offline: exit 1 when a lock is stale against pyproject.toml

``serve.txt`` pins the whole dependency closure of ``[project] dependencies`` (ONNX Runtime's CPU
flavour; the GPU stage installs ``onnxruntime-gpu`` at the same version) and is all the serving image
installs (``pip install --no-deps``, then ``pip check``). ``export.txt`` pins what the ``export`` extra
adds on top (onnx, h5py and theirs), used only in the build stage. Pins are resolved for the images'
platform (CPython 3.11, manylinux x86_64) on the package index alone: this machine's pip
configuration (extra indexes, local wheel folders, constraints) is left out. Each file records the
sha256 of the pyproject lists it was made from, so ``--check`` (and ``tests/test_deploy_static.py``)
knows when it is stale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlparse

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parents[1] / "pyproject.toml"
SERVE, EXPORT = HERE / "serve.txt", HERE / "export.txt"
INDEX = "https://pypi.org/simple"
PYTHON, PLATFORM = "3.11", "manylinux_2_36_x86_64"  # Debian bookworm's python3 and glibc 2.36
# pip takes a custom --platform literally: every manylinux tag glibc 2.36 can run.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)] + [
    f"manylinux{tag}_x86_64" for tag in ("2014", "2010", "1")
]
# Environment markers of the images, for pyproject's conditional requirements.
IMAGE_ENV = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.2", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip
ORT = "onnxruntime"  # the flavour the lock pins; onnxruntime-gpu is the same release
EXTRA = "export"
SERVED_EXTRAS = ("grpc", "tracing")  # the image serves gRPC (TLSERVE_GRPC_PORT) and can export traces (OTEL_*)


def sources(pyproject: Path = PYPROJECT) -> dict[str, list[str]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    served = project["dependencies"] + [d for extra in SERVED_EXTRAS for d in extras[extra]]
    return {"dependencies": served, EXTRA: extras[EXTRA]}


def digest(pyproject: Path = PYPROJECT) -> str:
    return hashlib.sha256(json.dumps(sources(pyproject), sort_keys=True).encode()).hexdigest()


def wanted(lines: list[str]) -> list[Requirement]:
    """The requirements that apply in the images; any ONNX Runtime flavour becomes :data:`ORT`."""
    out: dict[str, Requirement] = {}
    for line in lines:
        req = Requirement(line)
        if canonicalize_name(req.name) in (ORT, f"{ORT}-gpu"):
            req = Requirement(f"{ORT}{req.specifier}")
        elif req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        req.marker = None
        out.setdefault(canonicalize_name(req.name), req)
    return list(out.values())


def read_lock(path: Path) -> tuple[str | None, dict[str, Version]]:
    """The pyproject digest a lock records, and its pins (canonical name -> version)."""
    recorded, pins = None, {}
    for line in path.read_text().splitlines():
        if line.startswith("# pyproject sha256: "):
            recorded = line.split(": ", 1)[1].split()[0]
        elif line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name.strip())] = Version(version.strip())
    return recorded, pins


def problems(pyproject: Path = PYPROJECT, serve: Path = SERVE, export: Path = EXPORT) -> list[str]:
    """Why the locks do not match pyproject.toml (empty when they do)."""
    found = []
    want = sources(pyproject)
    locks = {serve: wanted(want["dependencies"]), export: wanted(want[EXTRA])}
    pins: dict[Path, dict[str, Version]] = {}
    for path, reqs in locks.items():
        if not path.exists():
            found.append(f"{path.name} is missing")
            continue
        recorded, pins[path] = read_lock(path)
        if recorded != digest(pyproject):
            found.append(
                f"{path.name} was made from other pyproject.toml dependencies (sha256 {recorded}, now {digest(pyproject)})"
            )
        for req in reqs:
            have = pins[path].get(canonicalize_name(req.name))
            if have is None:
                found.append(f"{path.name} does not pin {req.name}")
            elif not req.specifier.contains(have, prereleases=True):
                found.append(f"{path.name} pins {req.name}=={have}, outside pyproject's {req}")
    if len(pins) == 2:
        both = sorted(set(pins[serve]) & set(pins[export]))
        if both:
            found.append(f"pinned in both {serve.name} and {export.name}: {both}")
    return found


def _pip_env() -> tuple[dict[str, str], list[str]]:
    """pip on the index alone: no PIP_* variables, no site configuration (keeps only a custom CA)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["XDG_CONFIG_DIRS"] = tempfile.mkdtemp(prefix="tlserve-lock-")  # hides /etc/xdg/pip
    env["PIP_CONFIG_FILE"] = os.devnull
    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    return env, ["--cert", cert] if cert and Path(cert).is_file() else []


def resolve(requirements: list[str], constraints: dict[str, Version] | None = None, index: str = INDEX) -> dict[str, Version]:
    """Every distribution pip would install for ``requirements`` in the images (name -> version)."""
    env, cert = _pip_env()
    with tempfile.TemporaryDirectory(prefix="tlserve-lock-") as tmp:
        reqs, cons, report = Path(tmp, "in.txt"), Path(tmp, "constraints.txt"), Path(tmp, "report.json")
        reqs.write_text("\n".join(requirements) + "\n")
        cons.write_text("".join(f"{n}=={v}\n" for n, v in (constraints or {}).items()))
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--isolated",
               "--disable-pip-version-check", "--report", str(report), "--index-url", index, *cert,
               "--only-binary=:all:", "--python-version", PYTHON, *(f"--platform={p}" for p in PLATFORMS),
               "--implementation", "cp", "--abi", f"cp{PYTHON.replace('.', '')}",
               "--target", str(Path(tmp, "target")), "-r", str(reqs), "-c", str(cons)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        installs = json.loads(report.read_text())["install"]
    host = urlparse(index).hostname
    for item in installs:
        url = item["download_info"]["url"]
        if urlparse(url).scheme != "https":
            raise SystemExit(f"{item['metadata']['name']} resolved from {url}, not from the index {host}")
    return {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in installs}


def write(path: Path, pins: dict[str, Version], what: str, index: str) -> None:
    lines = [
        f"# {what}",
        "# Made by `python deploy/requirements/lock.py` from pyproject.toml: do not edit by hand.",
        f"# pyproject sha256: {digest()} ([project] dependencies + optional-dependencies.{EXTRA})",
        f"# Resolved for CPython {PYTHON}, {PLATFORM} (and older manylinux), on {index}.",
        *(f"{name}=={pins[name]}" for name in sorted(pins)),
    ]
    path.write_text("\n".join(lines) + "\n")


def lock(index: str = INDEX) -> None:
    want = sources()
    serve_reqs = [str(r) for r in wanted(want["dependencies"])]
    # One ONNX Runtime release for both images: the newest that exists as onnxruntime-gpu too.
    ort = next(r for r in wanted(want["dependencies"]) if r.name == ORT)
    gpu_release = resolve([f"{ORT}-gpu{ort.specifier}"], index=index)[f"{ORT}-gpu"]
    serve = resolve(serve_reqs, constraints={ORT: gpu_release}, index=index)
    full = resolve(serve_reqs + [str(r) for r in wanted(want[EXTRA])], constraints=serve, index=index)
    export = {n: v for n, v in full.items() if n not in serve}
    # The GPU image installs onnxruntime-gpu at the same version with the same pins: it must need nothing else.
    others = {n: v for n, v in serve.items() if n != ORT}
    gpu = resolve([f"{ORT}-gpu=={serve[ORT]}"], constraints=others, index=index)
    extra = sorted(set(gpu) - set(serve) - {f"{ORT}-gpu"})
    if extra:
        raise SystemExit(f"{ORT}-gpu=={serve[ORT]} needs {extra}, which serve.txt lacks: the GPU stage would break")
    write(SERVE, serve, "Serving image (Dockerfile stage `deps`): pip install --no-deps -r serve.txt", index)
    write(EXPORT, export, f"Build stage only, on top of serve.txt: the `{EXTRA}` extra (tlserve export, bench)", index)
    print(f"{SERVE.name}: {len(serve)} pins; {EXPORT.name}: {len(export)} pins ({', '.join(sorted(export))})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only say whether the locks match pyproject.toml (offline)")
    p.add_argument("--index-url", default=INDEX)
    args = p.parse_args(argv)
    if args.check:
        found = problems()
        for line in found:
            print(f"stale: {line}", file=sys.stderr)
        if found:
            print("run: python deploy/requirements/lock.py", file=sys.stderr)
        return 1 if found else 0
    lock(args.index_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
