"""Real nginx (Debian's ``nginx`` package) in front of real ``tlserve serve`` replicas.

nginx runs the very file ``deploy/nginx/tlserve.conf``, rendered by ``deploy/nginx/render.py`` with
only the upstream and listen addresses changed for loopback. Drills under load, each a few hundred
classify requests from concurrent clients: a replica stopped (SIGTERM), a rolling restart (SIGTERM,
start again, SIGTERM the other): zero failed requests, every replica served traffic. And a crash
(SIGKILL): only responses already under way on the dead replica may be lost.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.core.settings import DEFAULT_MAX_BODY_BYTES
from deploy.nginx.render import command, write_standalone
from tests.helpers import ServerProcess, free_port, image_bytes

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed: `apt-get install -y nginx` (.ci/run installs it)")

IMAGES = [image_bytes(color, seed=i) for i, color in enumerate([(210, 40, 40), (40, 40, 210)] * 4)]
LIMIT = DEFAULT_MAX_BODY_BYTES  # TLSERVE_MAX_BODY_BYTES default == client_max_body_size (64m)


@dataclass
class Nginx:
    """nginx in the foreground with everything under ``prefix``; its access log (stdout) goes to a file."""

    prefix: Path
    upstreams: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def start(self) -> Nginx:
        assert NGINX is not None
        main = write_standalone(self.prefix, self.upstreams, f"127.0.0.1:{self.port}")
        check = subprocess.run(command(NGINX, main, test=True), capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        with self.access_log.open("wb") as out, (self.prefix / "stderr.log").open("wb") as err:
            self.proc = subprocess.Popen(command(NGINX, main), stdout=out, stderr=err)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.prefix / "stderr.log").read_text() + self.error_log()
            try:
                if httpx.get(self.url + "/nginx-health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"nginx did not answer on {self.url}: {self.error_log()}")

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def entries(self) -> list[dict]:
        """Access-log lines written so far (a line still being written, without its newline, is left out)."""
        lines = self.access_log.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[[list[ServerProcess]], Nginx]]:
    started: list[Nginx] = []

    def start(servers: list[ServerProcess]) -> Nginx:
        lb = Nginx(tmp_path / f"nginx{len(started)}", [f"127.0.0.1:{s.port}" for s in servers])
        started.append(lb)
        return lb.start()

    yield start
    for lb in started:
        lb.stop()


@dataclass
class Load:
    """A few concurrent clients sending classify requests through nginx until told to stop."""

    url: str
    workers: int = 4
    sent: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _next(self) -> int | None:
        with self.lock:
            if self.stopping.is_set():
                return None
            self.sent += 1
            return self.sent

    def _worker(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while (n := self._next()) is not None:
                rid = f"drill-{n}"
                png = IMAGES[n % len(IMAGES)]
                try:
                    r = client.post("/v1/classify", files={"file": (f"{n}.png", png, "image/png")}, headers={"X-Request-ID": rid})
                    body = r.json()
                    good = (
                        r.status_code == 200
                        and r.headers.get_list("x-request-id") == [rid]
                        and body["request_id"] == rid
                        and body["results"][0]["label"] in ("red", "blue")
                    )
                    problem = None if good else f"{rid}: {r.status_code} {r.headers.get_list('x-request-id')} {r.text[:300]}"
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                    problem = f"{rid}: {type(exc).__name__}: {exc}"
                with self.lock:
                    if problem:
                        self.failures.append(problem)
                    else:
                        self.ok += 1

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.workers)]
        for t in self.threads:
            t.start()
        return self

    def wait_for(self, done: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.ok + len(self.failures) < done:
            assert time.monotonic() < deadline, f"only {self.ok} requests done after {timeout}s; failures: {self.failures[:5]}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)


def served_by(lb: Nginx) -> Counter[str]:
    """Successful classify requests per replica (the last address nginx tried), from nginx's access log."""
    return Counter(e["upstream_addr"].split(", ")[-1] for e in lb.entries() if e["uri"] == "/v1/classify" and e["status"] == 200)


def classified(server: ServerProcess) -> float:
    """``tlserve_images_total{endpoint="classify",outcome="ok"}`` of one replica."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tlserve_images_total" and s.labels.get("endpoint") == "classify" and s.labels.get("outcome") == "ok"
    )


def wait_until_served(lb: Nginx, server: ServerProcess, after: int, timeout: float = 20) -> None:
    """Passive health checks: wait until nginx routes traffic to ``server`` again (after ``after`` log lines)."""
    addr = f"127.0.0.1:{server.port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["upstream_addr"].split(", ")[-1] == addr and e["status"] == 200 for e in lb.entries()[after:]):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nginx sent no request to {addr} within {timeout}s")


def restart(server: ServerProcess, tmp_path: Path, name: str) -> ServerProcess:
    """A new process on the same port with the same environment (what a rolling update does)."""
    return ServerProcess(dict(server.env), port=server.port, log_path=tmp_path / f"{name}.log").start()


def check_log_matches_clients(lb: Nginx, load: Load) -> None:
    """Every request the clients sent is one access-log line, answered 200, under the client's request id."""
    lines = [e for e in lb.entries() if e["uri"] == "/v1/classify"]
    assert len(lines) == load.sent
    assert {e["request_id"] for e in lines} == {f"drill-{n}" for n in range(1, load.sent + 1)}
    assert {e["status"] for e in lines} == {200}


TRUNCATED = "RemoteProtocolError: peer closed connection without sending complete message body"


def stop_one_under_load(store, server_factory, nginx_factory, how: signal.Signals) -> tuple[Load, Nginx, ServerProcess]:
    """Two replicas under load; after 100 requests one gets ``how``; 200 more requests. Returns (load, lb, survivor)."""
    a, b = server_factory(store, default_head="colors"), server_factory(store, default_head="colors")
    lb = nginx_factory([a, b])
    load = Load(lb.url).start()
    try:
        load.wait_for(100)
        before = served_by(lb)
        assert before[f"127.0.0.1:{a.port}"] > 0 and before[f"127.0.0.1:{b.port}"] > 0, before
        assert a.proc is not None
        a.proc.send_signal(how)
        assert a.proc.wait(30) in (0, -signal.SIGTERM, -signal.SIGKILL), a.log_text()[-2000:]
        load.wait_for(load.ok + len(load.failures) + 200)
    finally:
        load.stop()
    assert load.sent >= 300
    check_log_matches_clients(lb, load)
    after = served_by(lb)
    assert after[f"127.0.0.1:{b.port}"] > before[f"127.0.0.1:{b.port}"] + 150  # b carried the rest
    assert classified(b) == after[f"127.0.0.1:{b.port}"]  # nginx's count and the replica's own agree
    retried = [e for e in lb.entries() if ", " in e["upstream_addr"]]
    print(f"{how.name}: served {dict(after)}; {len(retried)} request(s) retried on the other replica")
    return load, lb, b


@pytest.mark.slow
def test_replica_stopped_under_load_loses_no_request(tiny_store, server_factory, nginx_factory) -> None:
    """SIGTERM (a scale-down, a redeploy): the replica drains, nginx retries whatever it refuses."""
    load, _, _ = stop_one_under_load(tiny_store, server_factory, nginx_factory, signal.SIGTERM)
    assert load.failures == [], load.failures[:10]
    assert load.ok == load.sent


@pytest.mark.slow
def test_replica_crash_under_load_loses_only_responses_already_started(tiny_store, server_factory, nginx_factory) -> None:
    """SIGKILL: every request the dead replica had not begun to answer is retried on the other one.

    The one thing no load balancer can repair: a response whose headers were already relayed to the
    client when the replica died mid-answer (nginx then closes the connection: a truncated body). At
    most one such request per client connection; everything else succeeds.
    """
    load, _, _ = stop_one_under_load(tiny_store, server_factory, nginx_factory, signal.SIGKILL)
    assert all(TRUNCATED in f for f in load.failures), load.failures[:10]
    assert len(load.failures) <= load.workers
    assert load.ok + len(load.failures) == load.sent


@pytest.mark.slow
def test_rolling_restart_under_load_loses_no_request(tiny_store, server_factory, nginx_factory, tmp_path) -> None:
    a, b = server_factory(tiny_store, default_head="colors"), server_factory(tiny_store, default_head="colors")
    lb = nginx_factory([a, b])
    restarted: list[ServerProcess] = []
    load = Load(lb.url).start()
    try:
        load.wait_for(60)
        for old, name in ((a, "a2"), (b, "b2")):
            old.terminate()  # SIGTERM: /readyz 503, listener closed, in-flight requests finished
            assert old.proc is not None
            assert old.proc.wait(30) in (0, -signal.SIGTERM), old.log_text()[-2000:]
            mark = len(lb.entries())
            new = restart(old, tmp_path, name)
            restarted.append(new)
            wait_until_served(lb, new, mark)  # only then is the next replica taken down
        load.wait_for(max(300, load.ok + len(load.failures) + 60))
    finally:
        load.stop()
        for server in restarted:
            server.stop()
    assert load.failures == [], load.failures[:10]
    assert load.ok == load.sent >= 300
    check_log_matches_clients(lb, load)
    served = served_by(lb)
    assert served[f"127.0.0.1:{a.port}"] > 0 and served[f"127.0.0.1:{b.port}"] > 0, served
    for server in (a, b, *restarted):
        assert "Traceback" not in server.log_text(), server.log_text()[-2000:]


def test_nginx_front_limits_ids_and_errors(tiny_store, server_factory, nginx_factory) -> None:
    server = server_factory(tiny_store, default_head="colors")
    lb = nginx_factory([server])
    with httpx.Client(base_url=lb.url, timeout=30) as client:
        # the request id: the client's is kept, exactly once; without one nginx makes one and the service uses it
        r = client.post("/v1/classify", content=IMAGES[0], headers={"Content-Type": "image/png", "X-Request-ID": "abc-1"})
        assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["abc-1"] and r.json()["request_id"] == "abc-1"
        r = client.post("/v1/classify", content=IMAGES[1], headers={"Content-Type": "image/png"})
        rid = r.headers.get_list("x-request-id")
        assert r.status_code == 200 and len(rid) == 1 and len(rid[0]) == 32 and r.json()["request_id"] == rid[0]

        # body limits agree: a body of exactly the service's limit passes nginx and is judged by the service
        r = client.post("/v1/classify", content=b"\0" * LIMIT, headers={"Content-Type": "image/png"})
        assert r.status_code in (415, 422), r.text
        assert r.json()["error"]["code"] != "body_too_large"
        # one byte more is refused by nginx, in the service's JSON error shape
        r = client.post(
            "/v1/classify", content=b"\0" * (LIMIT + 1), headers={"Content-Type": "image/png", "X-Request-ID": "big-1"}
        )
        assert r.status_code == 413
        assert r.json()["error"] == {
            "code": "body_too_large",
            "message": f"body is over the load balancer limit of {LIMIT // 2**20} MiB (client_max_body_size)",
            "request_id": "big-1",
        }

        # probes pass through; metrics are per replica and refused at the load balancer
        assert client.get("/readyz").json()["status"] == "ready"
        assert client.get("/metrics").status_code == 404

        # no replica left: a JSON 503 with Retry-After, not nginx's HTML 502
        server.stop()
        r = client.post("/v1/classify", content=IMAGES[0], headers={"Content-Type": "image/png", "X-Request-ID": "down-1"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "no_replica" and r.headers.get_list("x-request-id") == ["down-1"]
