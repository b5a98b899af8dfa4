"""Training over HTTP, end to end: real servers (uvicorn on loopback), real photos from ../shared, a real
(tiny) ONNX extractor, the shared store on disk.

The done-when flow over HTTP alone, on two replicas sharing one store; hostile archives and every upload
limit refused with named errors (and nothing stored); admin keys; a server stopped (SIGTERM) or killed
(SIGKILL) mid-job leaves no version, and its job is reported failed by the replicas that remain.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.recipe import VIEWS
from app.storage.store import ModelStore
from tests.helpers import ADMIN as DEFAULT_ADMIN
from tests.helpers import SHARED_DATA, ServerProcess, image_bytes

INFER, ADMIN = "infer-key", "admin-key"
KEYS = {"api_keys": INFER, "admin_keys": ADMIN}
AS_ADMIN = {"X-API-Key": ADMIN}
AS_USER = {"X-API-Key": INFER}


@pytest.fixture(scope="module")
def photos() -> dict[str, list[Path]]:
    """Real photos per class from ../shared, sorted (deterministic)."""
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real photos live in ../shared)")
    return {label: sorted((SHARED_DATA / "train" / label).iterdir()) for label in ("cat", "dog")}


def parts(photos: dict[str, list[Path]], start: int, n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """``n`` photos a class from index ``start``: file parts named by their label."""
    return [(label, (p.name, p.read_bytes(), "image/jpeg")) for label, ps in photos.items() for p in ps[start : start + n]]


def wait_job(server: ServerProcess, location: str, timeout: float = 60, until: Callable[[dict], bool] | None = None) -> dict:
    done = until or (lambda r: r["state"] in ("succeeded", "failed"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = httpx.get(server.url + location, headers=AS_USER, timeout=10).json()
        if done(record):
            return record
        time.sleep(0.05)
    raise TimeoutError(f"{location}: {record}")


def committed_versions(store: Path, head: str) -> list[str]:
    folder = store / "heads" / head
    return sorted(p.name for p in folder.iterdir() if p.name.isdigit() and (p / "card.json").exists()) if folder.exists() else []


def error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]


@pytest.fixture
def store(tmp_path: Path, tiny_store: ModelStore) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(tiny_store.root, dst)
    return dst


# --- the done-when flow ------------------------------------------------------------------------------


def test_create_classify_retrain_compare_roll_back_over_http_on_two_replicas(photos, store, server_factory) -> None:
    a = server_factory(ModelStore(store), default_head="colors", head_poll_interval_s=0.3, job_heartbeat_s=0.5, **KEYS)
    b = server_factory(ModelStore(store), default_head="colors", head_poll_interval_s=0.3, job_heartbeat_s=0.5, **KEYS)
    first = parts(photos, 0, 5)

    # admin only: no key 401, an inference key 403 (nothing stored, no job)
    assert httpx.post(a.url + "/v1/heads/pets/train", files=first).status_code == 401
    r = httpx.post(a.url + "/v1/heads/pets/train", files=first, headers=AS_USER)
    assert r.status_code == 403 and error(r)["code"] == "forbidden"
    assert httpx.get(a.url + "/v1/jobs?head=pets", headers=AS_USER).json() == {"jobs": []}

    # create the head from photos: 202 + Location, polled on the OTHER replica (the record is in the shared store)
    r = httpx.post(a.url + "/v1/heads/pets/train", files=first, data={"val_fraction": "0.2"}, headers=AS_ADMIN, timeout=60)
    assert r.status_code == 202, r.text
    job1 = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job1['id']}" and job1["state"] in ("queued", "running")
    assert job1["data"]["validation_set"]["chosen_now"] and job1["data"]["validation_per_class"] == {"cat": 1, "dog": 1}
    done1 = wait_job(b, r.headers["location"])
    assert done1["state"] == "succeeded", done1
    assert done1 == httpx.get(a.url + r.headers["location"], headers=AS_USER).json()  # every replica answers alike
    assert done1["version"] == 1 and done1["promoted"] is True and done1["error"] is None
    report1 = done1["report"]
    assert report1["classes"] == ["cat", "dog"] and report1["n_val"] == 2 and report1["n_train"] == 8
    assert sum(map(sum, report1["confusion_matrix"])) == 2 and set(report1["per_class"]) == {"cat", "dog"}
    assert {"precision", "recall", "f1", "support"} <= set(report1["per_class"]["cat"])
    assert done1["phases"]["features"]["done"] == 8 and done1["phases"]["validation features"]["done"] == 2
    extracted = re.search(r"^tlserve_training_images_total (\S+)$", httpx.get(a.url + "/metrics", headers=AS_USER).text, re.M)
    # the job's photos went through a's engine, counted as training: 10, and 3 more views of each of the 8 training
    # photos (the few-photo recipe's mirror and crops, app/core/recipe.py)
    assert extracted and float(extracted.group(1)) == 10 + 8 * (len(VIEWS) - 1)

    # classify with it, on the replica that trained it (at once) and on the other (within its poll interval)
    cat = photos["cat"][100].read_bytes()
    answer = httpx.post(a.url + "/v1/classify?head=pets", files={"file": ("c.jpg", cat)}, headers=AS_USER).json()
    assert answer["head"] == "pets" and answer["version"] == 1 and set(answer["results"][0]["probabilities"]) == {"cat", "dog"}
    deadline = time.monotonic() + 10
    while httpx.post(b.url + "/v1/classify?head=pets", files={"file": ("c.jpg", cat)}, headers=AS_USER).status_code != 200:
        assert time.monotonic() < deadline, "replica b never served the new head"
        time.sleep(0.1)

    # more examples (corrections from users), without training: content-addressed, deduplicated
    r = httpx.post(a.url + "/v1/heads/pets/examples", files=parts(photos, 5, 3) + parts(photos, 0, 1), headers=AS_ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"head": "pets", "added": 6, "duplicates": 2, "relabelled": 0, "examples": {"cat": 8, "dog": 8}}
    summary = httpx.get(b.url + "/v1/heads/pets/examples", headers=AS_USER).json()
    assert summary == {"head": "pets", "examples": {"cat": 8, "dog": 8}, "validation": {"cat": 1, "dog": 1}}
    assert httpx.post(a.url + "/v1/heads/pets/examples", files=parts(photos, 8, 1), headers=AS_USER).status_code == 403

    # retrain with every earlier photo plus a new one a class: a second version, the SAME validation photos
    r = httpx.post(b.url + "/v1/heads/pets/train", files=parts(photos, 8, 1), data={"c": "1"}, headers=AS_ADMIN, timeout=60)
    assert r.status_code == 202, r.text
    done2 = wait_job(a, r.headers["location"])
    assert done2["state"] == "succeeded" and done2["version"] == 2, done2
    assert done2["data"]["train_per_class"] == {"cat": 8, "dog": 8} and not done2["data"]["validation_set"]["chosen_now"]
    assert done2["data"]["validation_per_class"] == done1["data"]["validation_per_class"]
    assert done2["report"]["n_train"] == 16 and done2["report"]["n_val"] == 2 and done2["options"]["c"] == 1.0

    # versions carry their reports and job ids
    listing = httpx.get(a.url + "/v1/heads/pets/versions", headers=AS_USER).json()
    assert listing["current"] == 2 and [v["version"] for v in listing["versions"]] == [1, 2]
    assert [v["job_id"] for v in listing["versions"]] == [done1["id"], done2["id"]]
    assert listing["versions"][0]["report"] == report1
    card = httpx.get(a.url + "/v1/models/pets", headers=AS_USER).json()["card"]
    assert card["job"]["id"] == done2["id"] and card["training"]["split"]["kind"] == "fixed_validation"
    assert card["training"]["data"]["train_per_class"] == {"cat": 8, "dog": 8}

    # compare: both versions scored on the one fixed validation set, and each agrees with its own report
    cmp = httpx.get(b.url + "/v1/heads/pets/compare?a=1&b=2", headers=AS_USER, timeout=30).json()
    assert cmp["head"] == "pets" and cmp["validation_images"] == 2
    assert (cmp["a"]["version"], cmp["b"]["version"]) == (1, 2)
    for side, done in (("a", done1), ("b", done2)):
        assert cmp[side]["report"]["confusion_matrix"] == done["report"]["confusion_matrix"]
        assert cmp[side]["report"]["accuracy"] == done["report"]["accuracy"] and cmp[side]["excluded"] == 0
    r = httpx.get(b.url + "/v1/heads/pets/compare?a=1&b=7", headers=AS_USER)
    assert r.status_code == 404 and error(r)["code"] == "version_not_found" and "versions: 1, 2" in error(r)["message"]

    # roll back: version 1 serves again (this replica at once, the other within its poll interval)
    assert httpx.post(a.url + "/v1/heads/pets/rollback", headers=AS_USER).status_code == 403
    r = httpx.post(a.url + "/v1/heads/pets/rollback", headers=AS_ADMIN)
    assert r.status_code == 200 and r.json()["current"] == 1
    assert httpx.post(a.url + "/v1/classify?head=pets", files={"file": ("c.jpg", cat)}, headers=AS_USER).json()["version"] == 1
    deadline = time.monotonic() + 10
    while httpx.post(b.url + "/v1/classify?head=pets", files={"file": ("c.jpg", cat)}, headers=AS_USER).json()["version"] != 1:
        assert time.monotonic() < deadline, "replica b never served the rollback"
        time.sleep(0.1)

    # reload is an admin operation; jobs are listed newest first, on every replica
    assert httpx.post(a.url + "/v1/models/pets/reload", headers=AS_USER).status_code == 403
    assert httpx.post(a.url + "/v1/models/pets/reload", headers=AS_ADMIN).status_code == 200
    assert [j["id"] for j in httpx.get(b.url + "/v1/jobs?head=pets", headers=AS_USER).json()["jobs"]] == [
        done2["id"],
        done1["id"],
    ]
    r = httpx.get(a.url + "/v1/jobs/" + "0" * 32, headers=AS_USER)
    assert r.status_code == 404 and error(r)["code"] == "job_not_found"
    assert httpx.get(a.url + "/v1/jobs/../../manifest", headers=AS_USER).status_code == 404
    # the uploads were spooled and cleaned up: nothing left in the spool
    assert list((store / "heads" / ".spool").iterdir()) == []


# --- hostile archives and limits -----------------------------------------------------------------------

LIMITS = {"max_training_bytes": 4_000_000, "max_training_images": 30, "max_training_classes": 3, "max_archive_members": 40,
          "max_archive_bytes": 3_000_000, "max_archive_ratio": 50}  # fmt: skip


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_store: ModelStore, module_server_factory) -> Iterator[tuple[ServerProcess, Path]]:
    dst = tmp_path_factory.mktemp("limited") / "store"
    shutil.copytree(tiny_store.root, dst)
    yield module_server_factory(ModelStore(dst), default_head="colors", **LIMITS), dst


PNG = image_bytes((200, 40, 40), size=(32, 32))


def zip_of(members: dict[str, bytes], *, symlink: str | None = None, level: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=level) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16) | 0x20
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def tar_of(members: dict[str, bytes], *, special: tarfile.TarInfo | None = None, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if special is not None:
            tf.addfile(special)
    return buf.getvalue()


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


GOOD = {"red/a.png": PNG, "red/b.png": image_bytes((210, 30, 30), size=(32, 32), seed=1)}
HOSTILE = {
    "traversal": (lambda: zip_of({**GOOD, "../../etc/cron.d/x.png": PNG}), "unsafe_archive", "climbs out"),
    "absolute": (lambda: tar_of({**GOOD, "/etc/x.png": PNG}), "unsafe_archive", "absolute path"),
    "backslash": (lambda: zip_of({**GOOD, "red\\..\\..\\x.png": PNG}), "unsafe_archive", "backslash"),
    "zip symlink": (lambda: zip_of(GOOD, symlink="red/link.png"), "unsafe_archive", "symbolic link"),
    "tar symlink": (lambda: tar_of(GOOD, special=special("red/link.png", tarfile.SYMTYPE, "/etc/passwd")), "unsafe_archive", "symbolic link"),
    "tar hardlink": (lambda: tar_of(GOOD, special=special("red/hard.png", tarfile.LNKTYPE, "red/a.png")), "unsafe_archive", "hard link"),
    "tar device": (lambda: tar_of(GOOD, special=special("red/dev", tarfile.CHRTYPE)), "unsafe_archive", "character device"),
    "too many members": (lambda: zip_of({f"red/{i}.png": PNG for i in range(41)}), "archive_too_large", "max_archive_members"),
    "zip bomb ratio": (lambda: zip_of({**GOOD, "red/bomb.png": b"\0" * 2_000_000}, level=zipfile.ZIP_DEFLATED), "archive_too_large", "max_archive_ratio"),
    "tar.gz bomb ratio": (lambda: tar_of({**GOOD, "red/bomb.png": b"\0" * 2_000_000}), "archive_too_large", "max_archive_ratio"),
    "uncompressed bytes": (lambda: tar_of({**GOOD, "red/big.png": bytes(range(256)) * 12_000}, mode="w"), "archive_too_large", "max_archive_bytes"),
    "loose file": (lambda: zip_of({**GOOD, "x.png": PNG}), "invalid_dataset", "not inside a class folder"),
    "split folders": (lambda: zip_of({f"{split}/{k}": PNG for split in ("train", "val") for k in GOOD}), "invalid_dataset",
                      "looks like a dataset split"),
    "bad folder label": (lambda: zip_of({**GOOD, "r ed/x.png": PNG}), "invalid_label", "'r ed'"),
    "not an archive": (lambda: b"just some bytes, neither zip nor tar", "malformed_request", "neither a zip nor a tar"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_archives_are_refused_before_extraction_and_store_nothing(limited, kind) -> None:
    server, store = limited
    make, code, words = HOSTILE[kind]
    for route in ("examples", "train"):
        r = httpx.post(server.url + f"/v1/heads/hostile/{route}", files={"archive": ("upload.bin", make())}, timeout=30,
                       headers=DEFAULT_ADMIN)  # fmt: skip
        assert (r.json().get("error") or {}).get("code") == code, (route, r.status_code, r.text)
        assert words in error(r)["message"], error(r)["message"]
    assert not (store / "heads" / "hostile").exists()
    assert list((store / "heads" / ".spool").iterdir()) == []
    assert not (store / "heads" / ".jobs").exists() or not list((store / "heads" / ".jobs").iterdir())


def test_a_good_archive_is_unwrapped_and_its_junk_ignored(limited) -> None:
    server, store = limited
    members = {"photos/red/a.png": PNG, "photos/red/deeper/b.png": GOOD["red/b.png"], "photos/blue/c.png": image_bytes((30, 30, 210)),
               "photos/.DS_Store": b"junk", "__MACOSX/photos/red/._a.png": b"junk"}  # fmt: skip
    for i, archive in enumerate((zip_of(members, level=zipfile.ZIP_DEFLATED), tar_of(members))):
        r = httpx.post(server.url + f"/v1/heads/good{i}/examples", files={"archive": ("a", archive)}, headers=DEFAULT_ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() == {"head": f"good{i}", "added": 3, "duplicates": 0, "relabelled": 0, "examples": {"blue": 1, "red": 2}}
    # relabelling: the same bytes under another label is a correction
    r = httpx.post(server.url + "/v1/heads/good0/examples", files={"blue": ("a.png", PNG)}, headers=DEFAULT_ADMIN)
    assert r.json() == {"head": "good0", "added": 0, "duplicates": 1, "relabelled": 1, "examples": {"blue": 2, "red": 1}}
    objects = [p for p in (store / "heads" / "good0" / "examples" / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 3  # content-addressed: the relabelled photo is stored once


LIMIT_CASES = {
    "body over max_training_bytes": (lambda: {"files": {"red": ("a.png", b"\x89PNG" + b"\0" * 4_100_000)}}, 413, "body_too_large", "max_training_bytes"),
    "photos over max_training_images": (lambda: {"files": [("red", (f"{i}.png", PNG)) for i in range(31)]}, 413, "too_many_images", "max_training_images"),
    "archive photos over max_training_images": (lambda: {"files": {"archive": ("a.zip", zip_of({f"red/{i}.png": PNG for i in range(31)}))}}, 413, "too_many_images", "max_training_images"),
    "classes over max_training_classes": (lambda: {"files": [(c, (f"{c}.png", PNG)) for c in "abcd"]}, 422, "malformed_request", "max_training_classes"),
    "invalid label": (lambda: {"files": {"../etc": ("a.png", PNG)}}, 422, "invalid_label", "'../etc'"),
    "not a photo": (lambda: {"files": [("red", ("a.png", PNG)), ("red", ("notes.txt", b"hello"))]}, 415, "unsupported_format", "red/notes.txt"),
    "empty photo": (lambda: {"files": {"red": ("empty.png", b"")}}, 422, "empty_input", "red/empty.png"),
    "unknown text field": (lambda: {"files": {"red": ("a.png", PNG)}, "data": {"colour": "x"}}, 422, "malformed_request", "'colour'"),
    "not multipart": (lambda: {"content": PNG, "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type", "multipart"),
}  # fmt: skip
TRAIN_CASES = {
    "bad c": ({"c": "-1"}, "c must be 'auto' or a positive number"),
    "bad val_fraction": ({"val_fraction": "0.7"}, "val_fraction must be a number between 0 and 0.5"),
    "bad promote": ({"promote": "maybe"}, "promote must be true or false"),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_upload_limits_are_named_and_store_nothing(limited, case) -> None:
    server, store = limited
    make, status, code, words = LIMIT_CASES[case]
    for route in ("examples", "train"):
        kwargs = make()
        kwargs["headers"] = {**kwargs.get("headers", {}), **DEFAULT_ADMIN}
        r = httpx.post(server.url + f"/v1/heads/limits/{route}", timeout=30, **kwargs)
        assert (r.status_code, (r.json().get("error") or {}).get("code")) == (status, code), (route, r.text[:300])
        assert words in error(r)["message"], error(r)["message"]
    assert not (store / "heads" / "limits").exists()
    assert list((store / "heads" / ".spool").iterdir()) == []


def test_training_options_and_counts_are_checked_before_the_job(limited, photos) -> None:
    server, store = limited
    three = parts(photos, 0, 3)
    for case, (options, words) in TRAIN_CASES.items():
        r = httpx.post(server.url + "/v1/heads/opts/train", files=three, data=options, headers=DEFAULT_ADMIN)
        assert r.status_code == 422 and words in error(r)["message"], (case, r.text)
    # first training: every class needs 3 photos (1 for the fixed validation set, 2 to train on)
    r = httpx.post(server.url + "/v1/heads/opts/train", files=parts(photos, 0, 3)[:5], headers=DEFAULT_ADMIN)
    assert r.status_code == 422 and error(r)["code"] == "invalid_dataset", r.text
    assert "first training needs at least 3 photos a class" in error(r)["message"] and "'dog' has 2 photos" in error(r)["message"]
    r = httpx.post(
        server.url + "/v1/heads/opts/train",
        files=[("cat", (p.name, p.read_bytes())) for p in photos["cat"][:4]],
        headers=DEFAULT_ADMIN,
    )
    assert r.status_code == 422 and "at least two classes" in error(r)["message"]
    # no photos (a browser's empty file input is no photo): nothing to train on without the example store
    body = (b'--B\r\nContent-Disposition: form-data; name="use_examples"\r\n\r\nfalse\r\n'
            b'--B\r\nContent-Disposition: form-data; name="cat"; filename=""\r\nContent-Type: application/octet-stream\r\n\r\n\r\n--B--\r\n')  # fmt: skip
    r = httpx.post(
        server.url + "/v1/heads/opts/train",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=B", **DEFAULT_ADMIN},
    )
    assert r.status_code == 422 and error(r)["code"] == "empty_input" and "no photos" in error(r)["message"], r.text
    assert not (store / "heads" / "opts").exists()  # refused uploads store nothing


# --- a server stopped or killed mid-job --------------------------------------------------------------


def test_a_server_killed_or_stopped_mid_job_leaves_no_version(photos, store, server_factory) -> None:
    settings = {"default_head": "colors", "job_heartbeat_s": 0.4, "training_batch_images": 1, "decode_threads": 1}
    killed = server_factory(ModelStore(store), **settings)
    other = server_factory(ModelStore(store), **settings)

    def start_long_job(server: ServerProcess, start: int) -> str:
        r = httpx.post(server.url + "/v1/heads/long/train", files=parts(photos, start, 100), timeout=120, headers=DEFAULT_ADMIN)
        assert r.status_code == 202, r.text
        # as soon as it runs: a fast machine extracts 200 photos with the tiny extractor within a heartbeat or two
        wait_job(server, r.headers["location"], until=lambda j: j["state"] == "running")
        return r.headers["location"]

    # SIGKILL mid-job: the record still says running; a replica that remains reports it failed after 5 beats
    location = start_long_job(killed, 0)
    assert killed.proc is not None
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(10)
    assert httpx.get(other.url + location).json()["state"] == "running"  # not stale yet
    record = wait_job(other, location, timeout=10)
    assert record["state"] == "failed" and record["error"]["code"] == "replica_lost", record
    assert "stopped updating this job" in record["error"]["message"]
    assert committed_versions(store, "long") == []  # an uncommitted folder (if any) holds no card.json: invisible
    assert httpx.get(other.url + "/v1/heads/long/versions").status_code == 404
    assert list((store / "heads" / ".spool").iterdir()) == []  # uploads are spooled only while their request runs

    # SIGTERM mid-job: the job is cancelled, and recorded as such before the process exits
    location = start_long_job(other, 100)
    assert other.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM once shut down
    record = json.loads((store / "heads" / ".jobs" / (location.rsplit("/", 1)[1] + ".json")).read_text())
    assert record["state"] == "failed" and record["error"]["code"] == "shutting_down", record
    assert committed_versions(store, "long") == []
    # the example store kept every uploaded photo: a resubmission needs no new upload
    labels = json.loads((store / "heads" / "long" / "examples" / "labels.json").read_text())["examples"]
    assert sorted(Counter(e["label"] for e in labels.values()).items()) == [("cat", 200), ("dog", 200)]
