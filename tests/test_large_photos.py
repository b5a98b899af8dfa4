"""Phone photos as they really come: 200 MP JPEGs of 30-60 MB, 48 MP HEICs, with the default limits.

The heavy tests (``slow``, ``e2e``) run one real server on the real VGG16 store. The 200 MP JPEGs
are made once per session from real ../shared photos, with sensor-like noise added so they weigh
what a phone's do (a smooth upscale would compress to a few MB). Each must get the label its
source photo gets, and 8 of them in flight at once must raise the server's peak RSS (VmHWM) by
less than 1 GiB over its warmed-up idle peak.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.core.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGE_PIXELS, Settings
from app.storage.store import ModelStore
from tests import photos
from tests.helpers import ServerProcess, settings_env

PHONE_200MP = (16320, 12240)  # 199.8 MP, a 200 MP sensor's full-resolution JPEG
IPHONE_48MP = (8064, 6048)  # 48.8 MP, an iPhone's full-resolution HEIC
CONCURRENT = 8
GiB = 1024**3


def vm(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status in bytes (VmHWM: peak resident set, VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_defaults_admit_phone_photos() -> None:
    s = Settings()
    assert s.max_body_bytes == DEFAULT_MAX_BODY_BYTES >= 60 * 1024 * 1024  # a 60 MB 200 MP JPEG + multipart framing
    assert s.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS >= IPHONE_48MP[0] * IPHONE_48MP[1]
    assert PHONE_200MP[0] * PHONE_200MP[1] // 64 <= s.max_image_pixels  # its 1/8-scale draft decode fits
    assert {"HEIF", "AVIF"} <= s.formats


# --- fast: the tiny store, hand-written JPEGs ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(settings_env(tiny_store.root, default_head="colors"), log_path=tmp_path_factory.mktemp("big") / "s.log")
    yield srv.start()
    srv.stop()


def test_a_200_megapixel_jpeg_is_classified_and_a_multi_scan_bomb_refused(tiny_server: ServerProcess) -> None:
    flat = photos.flat_jpeg(*PHONE_200MP)  # baseline, one scan: decoded at 1/8 scale
    bomb = photos.flat_jpeg(*PHONE_200MP, interleaved=False)  # one scan per component: 1.2 GB of coefficients
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        r = client.post("/v1/classify", content=flat, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        r = client.post("/v1/classify", files=[("file", ("bomb.jpg", bomb, "image/jpeg"))])
        assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_large", r.text
        assert "multi-scan JPEG of 16320x12240" in r.json()["error"]["message"]
        assert client.get("/readyz").status_code == 200


# --- slow: real photos, the real model ----------------------------------------------------------
@pytest.fixture(scope="module")
def sources(shared_data: Path) -> list[Path]:
    """A cat and a dog from the validation photos."""
    return [sorted((shared_data / "val" / label).glob("*.jpg"))[0] for label in ("cat", "dog")]


@pytest.fixture(scope="module")
def phone_jpegs(sources: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One textured 200 MP JPEG per source photo, written once per session."""
    folder = tmp_path_factory.mktemp("phone_jpegs")
    return [photos.phone_jpeg(src, PHONE_200MP, folder / f"{src.stem}_200mp.jpg", seed=i) for i, src in enumerate(sources)]


@pytest.fixture(scope="module")
def real_server(real_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Default limits; two decode threads, as on a 2-CPU replica.
    env = settings_env(real_store.root, decode_threads=2)
    srv = ServerProcess(env, log_path=tmp_path_factory.mktemp("real") / "server.log")
    yield srv.start(timeout=180)
    srv.stop()


def labels_of(client: httpx.Client, files: list[tuple[str, bytes]]) -> list[str]:
    r = client.post("/v1/classify", files=[("file", (name, data, "image/jpeg")) for name, data in files])
    assert r.status_code == 200, r.text
    return [res["label"] for res in r.json()["results"]]


@pytest.mark.slow
@pytest.mark.e2e
def test_eight_concurrent_200_megapixel_jpegs_are_classified_within_a_gibibyte(
    real_server: ServerProcess, sources: list[Path], phone_jpegs: list[Path]
) -> None:
    assert real_server.proc is not None
    pid = real_server.proc.pid
    small = [(src.name, src.read_bytes()) for src in sources]
    big = [path.read_bytes() for path in phone_jpegs]
    for data in big:
        assert len(data) >= 30_000_000, f"{len(data)} bytes: not a phone-sized 200 MP JPEG"
        with Image.open(io.BytesIO(data)) as img:
            assert img.size == PHONE_200MP and img.format == "JPEG"
    with httpx.Client(base_url=real_server.url, timeout=300) as client:
        # Warm up with a batch of 8 small photos (ONNX Runtime's arena for that batch): the idle peak.
        want = labels_of(client, small * (CONCURRENT // len(small)))[: len(small)]
        assert want == ["cat", "dog"], want  # the sources are a cat and a dog, and the head knows them
        idle_hwm, idle_rss = vm(pid, "VmHWM"), vm(pid, "VmRSS")

        def send(i: int) -> str:
            data = big[i % len(big)]
            if i % 2:  # half raw bodies, half multipart
                r = httpx.post(
                    f"{real_server.url}/v1/classify", content=data, headers={"content-type": "image/jpeg"}, timeout=300
                )
            else:
                r = httpx.post(f"{real_server.url}/v1/classify", files=[("file", (f"{i}.jpg", data, "image/jpeg"))], timeout=300)
            assert r.status_code == 200, r.text[:500]
            return r.json()["results"][0]["label"]

        t0 = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            got = list(pool.map(send, range(CONCURRENT)))
        wall = time.monotonic() - t0
        peak = vm(pid, "VmHWM")
        assert client.get("/readyz").status_code == 200
    growth = peak - idle_hwm
    sent = sum(len(big[i % len(big)]) for i in range(CONCURRENT))
    print(
        f"\n8 x 200 MP JPEG ({sent / 1e6:.0f} MB sent, {min(map(len, big)) / 1e6:.1f}-{max(map(len, big)) / 1e6:.1f} MB each) "
        f"in {wall:.1f} s: idle VmRSS {idle_rss / 2**20:.0f} MiB, idle VmHWM {idle_hwm / 2**20:.0f} MiB, "
        f"peak VmHWM {peak / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB"
    )
    assert got == [want[i % len(want)] for i in range(CONCURRENT)], (got, want)
    assert growth < GiB, f"peak RSS grew by {growth / 2**20:.0f} MiB over idle"


@pytest.mark.slow
@pytest.mark.e2e
def test_a_48_megapixel_heic_is_classified_like_its_source(real_server: ServerProcess, sources: list[Path]) -> None:
    with httpx.Client(base_url=real_server.url, timeout=300) as client:
        src = sources[-1]
        with Image.open(src) as img:
            heic = photos.encode(img.convert("RGB").resize(IPHONE_48MP, Image.Resampling.BILINEAR), "HEIF", quality=60)
        with Image.open(io.BytesIO(heic)) as img:
            assert img.format == "HEIF" and img.size == IPHONE_48MP
        (want,) = labels_of(client, [(src.name, src.read_bytes())])
        r = client.post("/v1/classify", content=heic, headers={"content-type": "image/heic", "x-filename": "IMG_0001.HEIC"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["label"] == want
