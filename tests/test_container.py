"""The real image: built by Debian's podman from the Dockerfile users build, run as compose runs a replica.

``.ci/container build`` (the one place CI, ``make image`` and these tests build from) makes a Debian
bookworm base with debootstrap and runs ``podman build --format docker`` with only PYTHON_IMAGE
changed. The image is built once per session (all cached when ``.ci/run`` built it just before).
Containers get docker-compose.yml's own options (read-only root file system, /tmp a tmpfs, no new
privileges, 2 CPUs, 2 GB, its environment) and a published loopback port; nginx runs on the host with
the real deploy/nginx config. Skipped only when podman is absent (CI installs it: .ci/run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from packaging.utils import canonicalize_name

from deploy.requirements.lock import SERVE, read_lock
from tests.helpers import REPO, SHARED_DATA, free_port, image_bytes

PODMAN = shutil.which("podman")
pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(PODMAN is None, reason="podman is not installed: apt-get install podman runc debootstrap (.ci/run does)"),
]
yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extras: pip install -e '.[dev]'")

SCRIPT = REPO / ".ci" / "container"
ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / ".ci" / "containers.conf"))}
IMAGE = "localhost/tlserve:cpu"  # what `make image` builds
INT8_IMAGE, INT8_STORE = "localhost/tlserve-test:int8", "localhost/tlserve-test:int8-store"
HEAD_CARD = REPO / "model_store" / "heads" / "cats_vs_dogs" / "1" / "card.json"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert PODMAN is not None
    proc = subprocess.run([PODMAN, *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build(tag: str, *args: str, target: str = "cpu") -> float:
    """``.ci/container build``: seconds taken."""
    t0 = time.monotonic()
    cmd = [str(SCRIPT), "build", "--target", target, "-t", tag, *args]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=2400, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return time.monotonic() - t0


def image_mb(tag: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout) / 1e6


def say(request: pytest.FixtureRequest, line: str) -> None:
    """Print past pytest's capture (the image size belongs in CI's log)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[container] {line}")


def in_image(image: str, *args: str, entrypoint: str = "python") -> subprocess.CompletedProcess[str]:
    """A one-off command in ``image``, read-only like a replica."""
    return podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--entrypoint", entrypoint, image, *args, check=False)


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest) -> str:
    seconds = build(IMAGE)
    say(request, f"{IMAGE}: {image_mb(IMAGE):.0f} MB (podman image inspect .Size), build {seconds:.0f}s")
    return IMAGE


# --- running containers as compose does ----------------------------------------------------------


def compose_service() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["tlserve"]


def drain_timeout_s() -> float:
    """TLSERVE_DRAIN_TIMEOUT_S as compose sets it (30 s)."""
    return float(compose_service()["environment"]["TLSERVE_DRAIN_TIMEOUT_S"])


def compose_options() -> list[str]:
    """``podman run`` options of one replica, read from docker-compose.yml's ``tlserve`` service."""
    svc = compose_service()
    opts = ["--read-only"] if svc.get("read_only") else []
    opts += [o for path in svc.get("tmpfs", []) for o in ("--tmpfs", path)]
    opts += [o for sec in svc.get("security_opt", []) for o in ("--security-opt", sec)]
    limits = svc["deploy"]["resources"]["limits"]
    opts += ["--cpus", str(limits["cpus"]), "--memory", str(limits["memory"])]
    for key, value in svc["environment"].items():  # ${VAR:-default} as compose interpolates it
        value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1]) or m[2], str(value))
        opts += ["-e", f"{key}={value}"]
    return opts


@dataclass
class Container:
    image: str
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # more `podman run` options (a volume)
    port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"tlserve-test-{uuid.uuid4().hex[:8]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Container:
        extra = [o for k, v in self.env.items() for o in ("-e", f"{k}={v}")]
        podman(
            "run",
            "-d",
            "--name",
            self.name,
            *compose_options(),
            *extra,
            *self.args,
            "-p",
            f"127.0.0.1:{self.port}:8000",
            self.image,
        )
        return self

    def wait_ready(self, timeout: float = 240) -> Container:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited: {self.logs()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.url}/readyz not 200 after {timeout}s: {self.logs()[-3000:]}")

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.name, check=False).stdout.strip() == "true"

    def exit_code(self, timeout: float) -> int:
        return int(podman("wait", self.name, timeout=timeout).stdout.strip())

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *args, check=False)

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    """Containers a test starts (append them); removed afterwards."""
    started: list[Container] = []
    yield started
    for c in started:
        c.remove()


@pytest.fixture(scope="module")
def served(image: str) -> Iterator[Container]:
    replica = Container(image).start()
    try:
        yield replica.wait_ready()
    finally:
        replica.remove()


def photos(split: str, label: str, n: int) -> list[Path]:
    return sorted((SHARED_DATA / split / label).glob("*.jpg"))[:n]


def classify(url: str, files: list[Path]) -> list[dict]:
    parts = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in files]
    r = httpx.post(url + "/v1/classify", files=parts, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def shared_photo_hashes() -> dict[int, set[str]]:
    """Every photo under ../shared/data (both data sets): size -> sha256s."""
    out: dict[int, set[str]] = {}
    for path in SHARED_DATA.parent.rglob("*"):
        if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            out.setdefault(path.stat().st_size, set()).add(hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def layer_files_like(image: str, wanted: dict[int, set[str]], tmp: Path) -> set[str]:
    """The sha256s in ``wanted`` that some file in some layer of ``image`` has (every layer, not just the top)."""
    archive = tmp / f"{uuid.uuid4().hex}.tar"
    podman("save", "--format", "docker-archive", "-o", str(archive), image, timeout=600)
    found: set[str] = set()
    try:
        with tarfile.open(archive) as outer:
            for member in outer:
                if not (member.isfile() and member.name.endswith(".tar")):
                    continue
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as layer:
                    for f in layer:
                        if f.isfile() and f.size in wanted:
                            digest = hashlib.sha256(layer.extractfile(f).read()).hexdigest()  # type: ignore[union-attr]
                            found |= {digest} & wanted[f.size]
    finally:
        archive.unlink(missing_ok=True)
    return found


# --- the image --------------------------------------------------------------------------------


def test_image_metadata_survives_the_build(image: str) -> None:
    """`--format docker` keeps HEALTHCHECK (podman's OCI default drops it); user, entrypoint, port as built."""
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tlserve"] and config["Cmd"] == ["serve"]
    assert "8000/tcp" in config["ExposedPorts"]
    health = json.loads(podman("image", "inspect", image).stdout)[0].get("Healthcheck") or {}  # image level, not Config
    assert health.get("Test", [])[:2] == ["CMD", "python"] and "/livez" in " ".join(health["Test"]), config
    assert health["StartPeriod"] == 120 * 10**9
    assert "ORT_DISABLE_TELEMETRY=1" in config["Env"]


def test_slim_image_installs_exactly_the_serve_lock(image: str) -> None:
    """The venv holds serve.txt's pins and tlserve, nothing else: no onnx, h5py, sympy, pip, no test suites."""
    code = "import json, importlib.metadata as m; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    proc = in_image(image, "-c", code)
    assert proc.returncode == 0, proc.stderr
    installed = {canonicalize_name(k): v for k, v in json.loads(proc.stdout).items()}
    _, pins = read_lock(SERVE)
    assert installed == {**{k: str(v) for k, v in pins.items()}, "tlserve": "0.1.0"}
    assert not {"onnx", "h5py", "sympy", "pip", "setuptools"} & set(installed)
    tests = in_image(image, "/opt/venv/lib", "-type", "d", "-name", "tests", entrypoint="find")
    assert tests.returncode == 0 and tests.stdout == "", tests.stdout[:500]


def test_commands_left_out_of_the_image_say_which_extra_to_install(image: str) -> None:
    for command in (["export"], ["export", "--int8", "--calibration-dir", "/tmp"]):  # benchmarks are not in the image
        proc = in_image(image, *command, entrypoint="tlserve")
        assert proc.returncode == 2, (command, proc.returncode, proc.stderr)
        assert f"`tlserve {command[0]}` needs onnx, h5py" in proc.stderr and "install tlserve[export]" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


def test_training_runs_in_the_slim_image(image: str) -> None:
    """What training over HTTP needs is there: scikit-learn (C by cross-validation), the report, the PNG."""
    code = (
        "import numpy as np; from app.learning.crossval import C_GRID, cross_validate, fit; from app.learning.report import make_report, confusion_png; "
        "rng = np.random.default_rng(0); y = np.repeat([0, 1], 40); x = rng.normal(size=(80, 16)) + y[:, None]; "
        "cv = cross_validate(x, y, C_GRID, 2); c = max(cv.accuracy, key=cv.accuracy.get); "
        "r = make_report(y, fit(x, y, c).predict(x), ['a', 'b']); "
        "png = confusion_png(r, 't'); print(c, r.accuracy, png[:4] == b'\\x89PNG', len(png))"
    )
    proc = in_image(image, "-c", code)
    assert proc.returncode == 0, proc.stderr
    c, accuracy, is_png, _ = proc.stdout.split()
    assert float(c) > 0 and float(accuracy) > 0.8 and is_png == "True"


def test_no_shared_photo_is_in_any_layer(image: str, shared_data: Path, tmp_path: Path) -> None:
    wanted = shared_photo_hashes()
    control = HEAD_CARD.read_bytes()  # the scan must see what the image really holds
    wanted.setdefault(len(control), set()).add(hashlib.sha256(control).hexdigest())
    found = layer_files_like(image, wanted, tmp_path)
    assert found == {hashlib.sha256(control).hexdigest()}, f"{len(found) - 1} photo(s) from ../shared in {image}"


# --- one replica ---------------------------------------------------------------------------------


def test_replica_runs_as_uid_10001_on_a_read_only_root_with_tmpfs(served: Container) -> None:
    assert served.exec("id", "-u").stdout.strip() == "10001" and served.exec("id", "-g").stdout.strip() == "10001"
    denied = served.exec("touch", "/opt/tlserve/model_store/x")
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert served.exec("touch", "/tmp/x").returncode == 0
    mounts = served.exec("cat", "/proc/mounts").stdout.splitlines()
    assert any(m.split()[1] == "/" and "ro" in m.split()[3].split(",") for m in mounts), mounts
    assert any(m.split()[1:3] == ["/tmp", "tmpfs"] for m in mounts), mounts
    assert served.exec("grep", "NoNewPrivs:\t1", "/proc/1/status").returncode == 0
    # the image's own HEALTHCHECK, run by podman inside the container
    assert podman("healthcheck", "run", served.name, check=False).returncode == 0


def test_real_photos_are_classified_through_the_published_port(served: Container, shared_data: Path, real_store) -> None:
    info = httpx.get(served.url + "/v1/info", timeout=10).json()
    assert info["ready"] and info["providers"] == ["CPUExecutionProvider"] and info["threads"]["intra_op"] == 2
    # the export inside the build is byte for byte the one `tlserve export` makes here
    assert info["extractor"]["sha256"] == real_store.read_manifest()["variants"]["int8"]["sha256"]
    # the default build (PRECISION=int8, no photos) made the INT8 copy the committed table pins, byte for byte
    pinned = json.loads(real_store.calibration_path.read_text())["int8_sha256"]
    assert info["extractor"]["precision"] == "int8" and info["extractor"]["sha256"] == pinned, info["extractor"]
    assert "accuracy gate passed" in info["extractor"]["precision_reason"], info["extractor"]
    # no keys given (compose without tlserve.env): nothing that changes state is open, inference is
    for method, path in (("POST", "/v1/heads/cats_vs_dogs/rollback"), ("DELETE", "/v1/heads/cats_vs_dogs"),
                         ("POST", "/v1/models/cats_vs_dogs/reload")):  # fmt: skip
        refused = httpx.request(method, served.url + path, timeout=10)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_disabled", refused.text
        assert "TLSERVE_ADMIN_KEYS" in refused.json()["error"]["message"]
    cats, dogs = photos("val", "cat", 4), photos("val", "dog", 4)
    results = classify(served.url, cats + dogs)
    assert [r["label"] for r in results] == ["cat"] * 4 + ["dog"] * 4, results


def test_replica_logs_are_json(served: Container) -> None:
    rid = f"log-{uuid.uuid4().hex[:8]}"
    png = image_bytes(size=(64, 64))
    r = httpx.post(
        served.url + "/v1/classify", content=png, headers={"Content-Type": "image/png", "X-Request-ID": rid}, timeout=60
    )
    assert r.status_code == 200
    lines = [line for line in served.logs().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, start-up included
    assert any(rec.get("msg", "").startswith("warm-up done") for rec in records)
    (mine,) = [rec for rec in records if rec.get("request_id") == rid]
    assert mine["route"] == "/v1/classify" and mine["status"] == 200 and mine["images"] == 1


def test_sigterm_answers_every_request_in_flight_and_exits_within_the_drain_timeout(
    image: str, containers: list[Container]
) -> None:
    replica = Container(image)
    containers.append(replica.start())
    replica.wait_ready()
    drain = drain_timeout_s()

    def send(n: int) -> tuple[int, list[str]]:
        # 12 images a request: the default image serves INT8 (~50 ms an image here), so 8 requests of 2 finished
        # before the 8th arrived; 96 images keep the engine busy for seconds, well within the 30 s drain
        parts = [("file", (f"{n}-{i}.png", image_bytes(seed=PER_REQUEST * n + i, size=(160, 120)), "image/png"))
                 for i in range(PER_REQUEST)]  # fmt: skip
        r = httpx.post(replica.url + "/v1/classify", files=parts, timeout=120)
        return r.status_code, [x["label"] for x in r.json()["results"]] if r.status_code == 200 else [r.text[:200]]

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, n) for n in range(8)]
        deadline = time.monotonic() + 30
        while in_flight(replica) < 8 and time.monotonic() < deadline:  # all 8 accepted (the probe is the 9th)
            time.sleep(0.02)
        podman("kill", "--signal", "SIGTERM", replica.name)
        t0 = time.monotonic()
        pending = sum(not f.done() for f in futures)
        answers = [f.result() for f in futures]
    code = replica.exit_code(timeout=drain + 30)
    took = time.monotonic() - t0
    assert pending >= 4, f"only {pending} request(s) were still in flight at SIGTERM"
    assert [status for status, _ in answers] == [200] * 8, answers
    assert all(len(labels) == PER_REQUEST and set(labels) <= {"cat", "dog"} for _, labels in answers), answers
    assert code == 0 and took < drain, (code, took, replica.logs()[-2000:])
    assert any("SIGTERM" in line or "shutdown" in line.lower() for line in replica.logs().splitlines()[-20:])


PER_REQUEST = 12  # images in each of the 8 requests in flight at SIGTERM


def in_flight(replica: Container) -> float:
    text = httpx.get(replica.url + "/metrics", timeout=5).text
    match = re.search(r"^tlserve_in_flight_requests (\S+)$", text, re.MULTILINE)
    return float(match[1]) - 1 if match else 0.0


# --- two replicas behind nginx -------------------------------------------------------------------


def test_stopping_one_of_two_replicas_behind_nginx_under_load_fails_no_request(
    image: str, containers: list[Container], tmp_path: Path
) -> None:
    from tests.test_load_balancer import NGINX, Nginx, served_by

    if NGINX is None:
        pytest.skip("nginx is not installed: `apt-get install -y nginx` (.ci/run installs it)")
    a, b = Container(image), Container(image)
    containers += [a.start(), b.start()]
    a.wait_ready(), b.wait_ready()
    lb = Nginx(tmp_path / "nginx", [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]).start()
    done, failures, lock, finish = [0], [], threading.Lock(), threading.Event()
    pngs = [image_bytes(seed=i, size=(64, 64)) for i in range(8)]

    def sender(worker: int) -> None:
        """Send requests back to back until told to finish: the load never runs out before the stop."""
        n = worker
        while not finish.is_set():
            try:
                r = httpx.post(lb.url + "/v1/classify", content=pngs[n % 8], headers={"Content-Type": "image/png"}, timeout=120)
                problem = None if r.status_code == 200 and r.json()["results"][0]["label"] in ("cat", "dog") else r.text[:300]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            with lock:
                done[0] += 1
                if problem:
                    failures.append(f"{n}: {problem}")
            n += 8

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 300
        while done[0] < count and time.monotonic() < deadline and not failures:
            time.sleep(0.05)

    stopped: dict[str, float] = {}
    try:
        with ThreadPoolExecutor(8) as pool:
            for worker in range(8):
                pool.submit(sender, worker)
            try:
                wait_for(60)
                before = served_by(lb)
                t0, stopped["started_at"] = time.monotonic(), done[0]
                podman("stop", "-t", "45", a.name, timeout=90)  # compose's stop_grace_period: SIGTERM, drain, exit
                stopped["after_s"], stopped["ended_at"] = time.monotonic() - t0, done[0]
                wait_for(done[0] + 60)  # and b alone serves the load that keeps coming
            finally:
                finish.set()
    finally:
        lb.stop()
    after = served_by(lb)
    assert failures == [], failures[:10]
    assert before[f"127.0.0.1:{a.port}"] > 0 and before[f"127.0.0.1:{b.port}"] > 0, before
    assert done[0] >= stopped["ended_at"] + 60, (done, stopped)
    # every request answered after the stop returned was b's
    assert after[f"127.0.0.1:{b.port}"] - before[f"127.0.0.1:{b.port}"] >= done[0] - stopped["ended_at"] - 8, (before, after)
    assert stopped["after_s"] < drain_timeout_s() and a.exit_code(timeout=10) == 0, (stopped, a.logs()[-2000:])
    print(
        f"served {dict(after)}; a stopped in {stopped['after_s']:.1f}s, requests {stopped['started_at']}..{stopped['ended_at']}"
    )


# --- INT8 ----------------------------------------------------------------------------------------


def test_int8_image_is_calibrated_from_a_build_context_no_layer_keeps(
    image: str, shared_data: Path, containers: list[Container], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """PRECISION=int8 + --build-context calibration=DIR (deploy/README.md): served INT8, photos in no layer."""
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i, p in enumerate(p for pair in zip(photos("train", "cat", 16), photos("train", "dog", 16), strict=True) for p in pair):
        shutil.copy(p, calibration / f"{i:02d}-{p.name}")  # cats and dogs interleaved, in the order read
    # the first 16 calibrate, the other 16 check that the committed head agrees on INT8 features
    args = ["--build-arg", "PRECISION=int8", "--build-arg", "INT8_ARGS=--calibration-images 16",
            "--build-context", f"calibration={calibration}"]  # fmt: skip
    seconds = build(INT8_IMAGE, *args)
    build(INT8_STORE, *args, target="store")  # the stage that read the photos (cached: same layers)
    say(request, f"{INT8_IMAGE}: {image_mb(INT8_IMAGE):.0f} MB, build {seconds:.0f}s")

    replica = Container(INT8_IMAGE)
    containers.append(replica.start())
    replica.wait_ready()
    extractor = httpx.get(replica.url + "/v1/info", timeout=10).json()["extractor"]
    # the gate passed in the build (else `export --int8` fails it) and the start-up self-check here kept int8
    assert extractor["precision"] == "int8" and extractor["file"].endswith(".int8.onnx"), extractor
    assert "accuracy gate passed" in extractor["precision_reason"] and "start-up self-check:" in extractor["precision_reason"]
    results = classify(replica.url, photos("val", "cat", 2) + photos("val", "dog", 2))
    assert [r["label"] for r in results] == ["cat", "cat", "dog", "dog"], results

    wanted = shared_photo_hashes()
    control = HEAD_CARD.read_bytes()
    wanted.setdefault(len(control), set()).add(hashlib.sha256(control).hexdigest())
    for tag in (INT8_IMAGE, INT8_STORE):
        assert layer_files_like(tag, wanted, tmp_path) == {hashlib.sha256(control).hexdigest()}, tag


def test_two_replicas_share_compose_head_volume_and_train_over_http(image: str, shared_data: Path, tmp_path: Path) -> None:
    """compose's `heads` volume: seeded from the image (the default head) and writable by uid 10001 on a read-only
    root; a job trained over HTTP on one replica is answered, and its version served, by the other."""
    volume = f"tlserve-test-heads-{uuid.uuid4().hex[:8]}"
    (mount,) = compose_service()["volumes"]
    podman("volume", "create", volume)
    env_file = tmp_path / "tlserve.env"  # compose's env_file, made by the documented command
    made = subprocess.run([sys.executable, "-m", "app.cli", "keys", "--env", str(env_file)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert made.returncode == 0 and oct(env_file.stat().st_mode & 0o777) == "0o600", made.stderr
    keys = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and not line.startswith("#"))
    admin = {"X-API-Key": keys["TLSERVE_ADMIN_KEYS"]}
    volume_args = ["-v", f"{volume}:{mount.split(':', 1)[1]}", "--env-file", str(env_file)]
    replicas = [Container(image, {"TLSERVE_HEAD_POLL_INTERVAL_S": "1"}, volume_args) for _ in range(2)]
    try:
        a, b = (c.start() for c in replicas)
        a.wait_ready()
        b.wait_ready()
        assert [m["name"] for m in httpx.get(b.url + "/v1/models", timeout=10, headers=admin).json()["models"]] == [
            "cats_vs_dogs"
        ]
        files = [(label, (p.name, p.read_bytes(), "image/jpeg")) for label in ("cat", "dog") for p in photos("train", label, 4)]
        r = httpx.post(a.url + "/v1/heads/pets/train", files=files, timeout=120, headers=admin)
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 300
        while (job := httpx.get(b.url + r.headers["location"], timeout=10, headers=admin).json())["state"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "succeeded" and job["version"] == 1 and job["report"]["n_val"] == 2, job
        deadline = time.monotonic() + 30
        while (answer := httpx.post(b.url + "/v1/classify?head=pets", files={"file": ("c.jpg", photos("val", "cat", 1)[0].read_bytes())},
                                    timeout=60, headers={"X-API-Key": keys["TLSERVE_API_KEYS"]})).status_code != 200:  # fmt: skip
            assert answer.status_code != 401, answer.text  # the inference key from the env file serves
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.5)
        assert answer.json()["head"] == "pets" and answer.json()["version"] == 1
        owner = b.exec("python", "-c", f"import os; print(os.stat('{mount.split(':', 1)[1]}/pets/1/card.json').st_uid)")
        assert owner.stdout.strip() == "10001", owner.stderr
    finally:
        for c in replicas:
            c.remove()
        podman("volume", "rm", "-f", volume, check=False)
