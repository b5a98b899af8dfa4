"""Shared test helpers: tiny real models, synthetic images, a real uvicorn server process."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from app.learning.weights import LAYERS, Weights

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TLSERVE_SHARED_DATA", REPO.parent / "shared" / "data" / "cats_vs_dogs"))
TINY_CHANNELS = (4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8)


def tiny_weights(seed: int = 0, channels: tuple[int, ...] = TINY_CHANNELS) -> Weights:
    """A real VGG16-shaped conv stack with few channels (He init): exports in milliseconds."""
    rng = np.random.default_rng(seed)
    weights, in_ch = {}, 3
    for name, out in zip(LAYERS, channels, strict=True):
        std = np.sqrt(2.0 / (in_ch * 9))
        weights[name] = (rng.normal(0, std, (out, in_ch, 3, 3)).astype(np.float32), rng.normal(0, 0.1, out).astype(np.float32))
        in_ch = out
    return weights


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30),
    fmt: str = "PNG",
    size: tuple[int, int] = (48, 40),
    noise: int = 20,
    seed: int = 0,
    **save,
) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, np.int16) + rng.integers(-noise, noise + 1, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if fmt == "JPEG":
        save.setdefault("quality", 90)
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def write_color_dataset(root: Path, per_class: int = 12) -> Path:
    """``root/red/*.png`` and ``root/blue/*.png``: a task the tiny extractor can learn."""
    for label, color in (("red", (210, 40, 40)), ("blue", (40, 40, 210))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / label / f"{label}_{i}.png").write_bytes(image_bytes(color, seed=i, size=(40 + i, 36 + i)))
    return root


# Admin operations are refused unless an admin key is set (app/api/deps.py): test servers get this one by default
# (inference stays open without TLSERVE_API_KEYS), and tests send ADMIN where they change state.
ADMIN_KEY = "test-admin-key"
ADMIN = {"X-API-Key": ADMIN_KEY}


def settings_env(store_root: Path, **settings: object) -> dict[str, str]:
    """``TLSERVE_*`` variables for a server on ``store_root``: one intra-op thread, the response cache off (so
    every request a test sends reaches the engine; the cache's own tests turn it on) and admin key ``ADMIN_KEY``,
    plus ``settings`` (``admin_keys=""`` for a server with admin operations off)."""
    env = {"TLSERVE_MODEL_STORE": str(store_root), "TLSERVE_INTRA_OP_THREADS": "1", "TLSERVE_RESPONSE_CACHE_SIZE": "0",
           "TLSERVE_ADMIN_KEYS": ADMIN_KEY}  # fmt: skip
    env.update({f"TLSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """``tlserve serve`` in a real subprocess on a loopback port."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 90.0) -> ServerProcess:
        env = {**os.environ, "TLSERVE_LOG_FORMAT": "json", "TLSERVE_HEAD_POLL_INTERVAL_S": "0", **self.env}
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.wait("/readyz" if wait_ready else "/livez", timeout)
        return self

    def wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_text()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}{path} not 200 after {timeout}s; log: {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@contextmanager
def server_pool(log_dir: Path) -> Iterator[Callable[..., ServerProcess]]:
    """The one way tests and benchmarks start servers: ``start(store_root, wait_ready=True, **settings)``
    starts ``tlserve serve`` on ``store_root`` with ``TLSERVE_<SETTING>`` values; all are stopped on exit."""
    started: list[ServerProcess] = []

    def start(store_root: Path, wait_ready: bool = True, env: dict[str, str] | None = None, **settings: object) -> ServerProcess:
        """``env``: other variables for the process (``OTEL_*``), beside the ``TLSERVE_*`` of ``settings``."""
        server = ServerProcess(
            {**(env or {}), **settings_env(store_root, **settings)}, log_path=log_dir / f"server{len(started)}.log"
        )
        started.append(server)
        return server.start(wait_ready=wait_ready)

    try:
        yield start
    finally:
        for server in started:
            server.stop()
