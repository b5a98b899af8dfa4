"""Newcomer traps in the CLI, each closed: one flag name for a head, one ``top_k`` default, ``--no-promote``, and a
``heads delete`` that asks before it destroys anything."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.cli import build_parser
from app.storage.store import ModelStore
from tests.helpers import REPO, write_color_dataset


def _tlserve(store: ModelStore, *args: str, default_head: str = "colors") -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TLSERVE_MODEL_STORE": str(store.root),
        "TLSERVE_DEFAULT_HEAD": default_head,
        "TLSERVE_INTRA_OP_THREADS": "1",
    }
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_every_command_that_names_a_head_takes_head() -> None:
    parser = build_parser()
    for command in (["train", "DIR"], ["evaluate", "DIR"], ["predict", "x.jpg"], ["classify", "x.jpg"],
                    ["batch", "SRC", "--output", "OUT"]):  # fmt: skip
        args = parser.parse_args([*command, "--head", "pets"])
        assert (args.name if command[0] == "train" else args.head) == "pets", command
    assert parser.parse_args(["train", "DIR", "--name", "pets"]).name == "pets"  # the old spelling stays an alias


def test_top_k_has_one_default_every_class_everywhere() -> None:
    """predict, classify and batch default to no --top-k, as HTTP does: every class's probability."""
    parser = build_parser()
    for command in (["predict", "x.jpg"], ["classify", "x.jpg"], ["batch", "SRC", "--output", "OUT"]):
        assert parser.parse_args(command).top_k is None, command
    from app.batch import BatchJob
    from app.batch.job import metadata

    assert BatchJob(source="s", output="o").top_k is None

    head = SimpleNamespace(name="h", version=1, sha256="x", classes=["a", "b", "c"])
    source = SimpleNamespace(uri="s", root="s", classes=None)
    info = SimpleNamespace(raw={}, sha256="f", feature_space="f")
    meta = metadata(BatchJob(source="s", output="o"), source, info, head)  # type: ignore[arg-type]
    assert meta["top_k"] == 3  # every class, most likely first


def test_train_no_promote_writes_a_version_that_is_not_served(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    store = fresh_tiny_store
    before = store.heads.current_version("colors")
    data = write_color_dataset(tmp_path / "data", per_class=10)
    proc = _tlserve(store, "train", str(data), "--head", "colors", "--C", "1", "--no-progress", "--no-promote")
    assert proc.returncode == 0, proc.stderr[-2000:]
    new = max(store.heads.versions("colors"))
    assert new > before and store.heads.current_version("colors") == before
    assert f"not promoted (--no-promote): serve it with `tlserve heads promote colors {new}`" in proc.stdout
    proc = _tlserve(store, "train", str(data), "--name", "colors", "--C", "1", "--no-progress")  # default: promoted
    assert proc.returncode == 0 and store.heads.current_version("colors") == max(store.heads.versions("colors"))
    assert "(now current;" in proc.stdout


def _on_a_terminal(store: ModelStore, answer: str, *args: str) -> tuple[int, str]:
    """``tlserve heads ARGS`` with a pseudo-terminal as stdin/stdout, typing ``answer`` at its prompt."""
    main, child = pty.openpty()
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(store.root)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "heads", *args], cwd=REPO, env=env, stdin=child,
                            stdout=child, stderr=child)  # fmt: skip
    os.close(child)
    out, deadline, answered = b"", time.monotonic() + 60, False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            out += chunk
        if not answered and b"[y/N]" in out:
            os.write(main, answer.encode() + b"\n")
            answered = True
        if proc.poll() is not None and not ready:
            break
    code = proc.wait(10)
    os.close(main)
    return code, out.decode(errors="replace")


@pytest.mark.parametrize(("answer", "deleted"), [("n", False), ("", False), ("y", True)])
def test_heads_delete_asks_on_a_terminal(fresh_tiny_store: ModelStore, answer: str, deleted: bool) -> None:
    store = fresh_tiny_store
    code, out = _on_a_terminal(store, answer, "delete", "colors")
    assert "delete head 'colors' and all its versions? This cannot be undone. [y/N]" in out, out
    assert (code == 0) == deleted and ("colors" not in store.heads.names()) == deleted, out


def test_heads_delete_without_a_terminal_needs_yes(fresh_tiny_store: ModelStore) -> None:
    store = fresh_tiny_store
    proc = _tlserve(store, "heads", "delete", "colors", default_head="other")
    assert (
        proc.returncode == 2
        and "refusing to delete head 'colors' and all its versions without confirmation: pass --yes" in proc.stderr
    )
    assert "colors" in store.heads.names()
    refused = _tlserve(store, "heads", "delete", "colors", "--yes")  # the default head: as over HTTP, never deleted
    assert refused.returncode != 0 and "is the default head (TLSERVE_DEFAULT_HEAD)" in refused.stderr
    deleted = _tlserve(store, "heads", "delete", "colors", "--yes", default_head="other")
    assert deleted.returncode == 0 and "colors" not in store.heads.names()


def test_settings_are_printed_with_every_secret_redacted(tmp_path: Path) -> None:
    env = {**os.environ, "TLSERVE_API_KEYS": "infer-secret-1,infer-secret-2", "TLSERVE_ADMIN_KEYS": "admin-secret"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "settings"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "secret" not in proc.stdout
    shown = json.loads(proc.stdout)
    assert shown["api_keys"] == "<2 key(s), redacted>" and shown["admin_keys"] == "<1 key(s), redacted>"


def test_keys_writes_private_files_and_never_overwrites(tmp_path: Path) -> None:
    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "keys", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    for args, path in (((), tmp_path / "head-signing-key.pem"), (("--env", "tlserve.env"), tmp_path / "tlserve.env")):
        assert keys(*args).returncode == 0
        assert path.stat().st_mode & 0o777 == 0o600
        before = path.read_bytes()
        again = keys(*args)
        assert again.returncode == 2 and "refusing to overwrite" in again.stderr and path.read_bytes() == before
    env = dict(line.split("=", 1) for line in (tmp_path / "tlserve.env").read_text().splitlines() if "=" in line)
    assert set(env) == {"TLSERVE_API_KEYS", "TLSERVE_ADMIN_KEYS"} and all(len(v) >= 32 for v in env.values())
    ignored = subprocess.run(["git", "check-ignore", "head-signing-key.pem", "tlserve.env"], cwd=REPO, capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert ignored.stdout.split() == ["head-signing-key.pem", "tlserve.env"]  # the default names are git-ignored


def test_make_run_binds_the_settings_address_unless_told_otherwise() -> None:
    plain = subprocess.run(["make", "-n", "run"], cwd=REPO, capture_output=True, text=True, check=False).stdout
    told = subprocess.run(["make", "-n", "run", "HOST=0.0.0.0", "PORT=9001"], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout  # fmt: skip
    assert "tlserve serve --generate-admin-key" in plain and "--host" not in plain and "--port" not in plain
    assert "--host 0.0.0.0 --port 9001" in told
