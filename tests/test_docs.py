"""The docs cannot rot: their commands run against real servers, their names exist, their references are current.

- Every shell block of the README, the tutorials and the how-to guides carries a marker (``<!-- test: … -->``,
  see docs/development.md, "The docs"); ``run`` blocks are run with bash, in order, against a real ``tlserve
  serve`` on loopback started as ``make run`` starts it, on a copy of the real model store; an ``output`` block
  is compared with what the block before it printed (``…`` for anything volatile, numbers within 0.02).
- Every setting, CLI command and flag, route and error code the docs name exists, and every one that exists is
  named somewhere in the docs.
- The generated fragments (``python -m docs.gen``) are current; the site builds with warnings as errors and
  loads nothing from the internet.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from docs import gen
from tests.helpers import REPO, SHARED_DATA, ServerProcess, free_port

DOCS = REPO / "docs"
TESTED_PAGES = [REPO / "README.md", *sorted((DOCS / "tutorials").glob("*.md")), *sorted((DOCS / "howto").glob("*.md"))]
ALL_PAGES = [REPO / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
SHELL = ("bash", "sh", "shell", "console")
MARKER = re.compile(r"<!--\s*test:\s*(\S+)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
WILD = "…"
BIN = Path(sys.executable).parent
SHELL_VARS = "^(BASH|PIPESTATUS|FUNCNAME|COMP|HIST|LINENO|RANDOM|SECONDS|OPT|PPID|EUID|UID|GROUPS|SHELLOPTS|SRANDOM|EPOCH)"


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: str | None  # run | output | server | not-run
    args: str
    expected: Block | None = None

    def __str__(self) -> str:
        page = self.page.relative_to(REPO) if self.page.is_absolute() else self.page
        return f"{page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found: list[Block] = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2),
                           marker.group(1) if marker else None, marker.group(2) if marker else ""))  # fmt: skip
    for prev, block in itertools.pairwise(found):
        if block.marker == "output":
            assert prev.marker == "run", f"{block}: an output block follows a run block"
            prev.expected = block
    return found


# --- every command is marked; the set that is not run stays small ------------------------------------------------
def test_every_shell_block_of_the_tutorials_and_how_to_guides_is_marked() -> None:
    unmarked = [str(b) for p in TESTED_PAGES for b in blocks(p) if b.lang in SHELL and b.marker is None]
    assert not unmarked, f"shell blocks without a <!-- test: … --> marker: {unmarked}"
    known = {"run", "output", "server", "not-run"}
    bad = [f"{b}: {b.marker}" for p in TESTED_PAGES for b in blocks(p) if b.marker and b.marker not in known]
    assert not bad, bad


def test_blocks_not_run_say_why_and_are_few() -> None:
    not_run = [b for p in TESTED_PAGES for b in blocks(p) if b.marker == "not-run"]
    assert all(len(b.args) > 20 for b in not_run), [str(b) for b in not_run if len(b.args) <= 20]
    run = [b for p in TESTED_PAGES for b in blocks(p) if b.marker in ("run", "server")]
    assert len(not_run) <= 10 and len(run) >= 3 * len(not_run), (len(not_run), len(run))
    print("\nnot run:\n" + "\n".join(f"  {b}: {b.args}" for b in not_run))


# --- comparing what a command printed with what the page shows ---------------------------------------------------
def _match(expected: object, got: object, where: str = "") -> None:
    if expected == WILD:
        return
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(expected) == set(got), f"{where}: keys {sorted(expected)} vs {got}"
        for k, v in expected.items():
            _match(v, got[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(expected) == len(got), f"{where}: {expected} vs {got}"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            _match(e, g, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert isinstance(got, int | float) and abs(expected - got) <= 0.02, f"{where}: {expected} vs {got}"
    else:
        assert expected == got, f"{where}: {expected!r} vs {got!r}"


def check_output(block: Block, out: str) -> None:
    assert block.expected is not None
    shown = block.expected.code
    if block.expected.lang == "json":
        _match(json.loads(shown), json.loads(out), str(block))
        return
    pattern = "".join(".*" if part == WILD else re.escape(part) for part in re.split(f"({WILD})", shown.strip()))
    assert re.fullmatch(pattern, out.strip(), re.S), f"{block}: shows\n{shown}\nprinted\n{out}"


def test_output_matching_masks_volatile_fields_and_nothing_else() -> None:
    block = Block(
        Path("x"), 1, "bash", "", "run", "", Block(Path("x"), 2, "json", '{"a": "…", "b": 0.99, "c": [1]}', "output", "")
    )
    check_output(block, '{"a": "anything", "b": 0.985, "c": [1]}')
    for wrong in ('{"a": 1, "b": 0.9, "c": [1]}', '{"a": 1, "b": 0.99, "c": [2]}', '{"a": 1, "b": 0.99}'):
        with pytest.raises(AssertionError):
            check_output(block, wrong)
    text = Block(Path("x"), 1, "bash", "", "run", "", Block(Path("x"), 2, "text", "…\n2 [1, 2]", "output", ""))
    check_output(text, "pets 2 *\n2 [1, 2]")
    with pytest.raises(AssertionError):
        check_output(text, "2 [1, 3]")


# --- running the pages -------------------------------------------------------------------------------------------
def _photos(work: Path) -> None:
    """The files the pages' commands name, from ../shared's cats and dogs."""
    cats = sorted((SHARED_DATA / "val" / "cat").glob("*.jpg"))
    dogs = sorted((SHARED_DATA / "val" / "dog").glob("*.jpg"))
    shutil.copy(cats[0], work / "my_cat.jpg")
    shutil.copy(cats[0], work / "cat.jpg")
    shutil.copy(dogs[0], work / "dog.jpg")
    for i in range(1, 8):
        shutil.copy(cats[i], work / f"cat{i}.jpg")
        shutil.copy(dogs[i], work / f"dog{i}.jpg")
    for split, start, n in (("pets", 10, 10), ("pets_val", 30, 4)):
        for label, files in (("cat", cats), ("dog", dogs)):
            (work / "data" / split / label).mkdir(parents=True)
            for f in files[start : start + n]:
                shutil.copy(f, work / "data" / split / label / f.name)
    (work / "photos").mkdir()
    for f in cats[40:43] + dogs[40:43]:
        shutil.copy(f, work / "photos" / f.name)


def _store_copy(real: Path, dst: Path) -> Path:
    """A private model store: the exported files hard-linked (read only), everything else copied."""

    def link_or_copy(src: str, target: str) -> object:
        if src.endswith(".onnx") or "/downloads/" in src:
            try:
                return os.link(src, target)
            except OSError:
                pass
        return shutil.copy2(src, target)

    shutil.copytree(real, dst, copy_function=link_or_copy, ignore=shutil.ignore_patterns(".cache"))
    return dst


def make_run_command() -> list[str]:
    """What `make run` runs once its prerequisites are made: `make -n` with them taken as up to date."""
    out = subprocess.run(["make", "-n", "-s", "-o", ".venv/.installed", "-o", "model_store/manifest.json", "run"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout  # fmt: skip
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "tlserve serve" in lines[0], out
    return shlex.split(lines[0])


class Page:
    """One page's commands, in order, in a scratch folder, against a server started as `make run` starts it."""

    def __init__(self, page: Path, work: Path, store: Path) -> None:
        self.page, self.work, self.store = page, work, store
        self.port = free_port()
        self.server: ServerProcess | None = None
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "TLSERVE_MODEL_STORE": str(store),
                    "TLSERVE_LOG_FORMAT": "text", "TLSERVE_INTRA_OP_THREADS": "1", "PYTHONPATH": str(REPO),
                    "SHELL_VARS": SHELL_VARS}  # fmt: skip
        for k in ("TLSERVE_ADMIN_KEYS", "TLSERVE_API_KEYS"):
            self.env.pop(k, None)

    def start(self) -> None:
        """`make run`: the very command `make -n run` prints, on this page's port, its admin key read from its output."""
        cmd = make_run_command()
        argv = [str(BIN / "tlserve") if cmd[0].endswith("/tlserve") else cmd[0], *cmd[1:], "--port", str(self.port)]
        log = self.work / "server.log"
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.server = ServerProcess(self.env, port=self.port, proc=proc, log_path=log)
        self.server.wait("/readyz", 180)
        key = re.search(r"admin key for this run.*?\n\s*\n\s+(\S+)", log.read_text(), re.S)
        assert key, f"`make run` printed no admin key: {log.read_text()[-2000:]}"
        self.env["ADMIN_KEY"] = key.group(1)

    def run(self, block: Block) -> str:
        code = block.code.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
        # one shell per block, the page's variables carried from block to block (JOB=…)
        script = (
            "set -euo pipefail\n[ -f .docs-state ] && . ./.docs-state\ncompgen -v | sort > .docs-vars\n"
            "__save() { local n; n=$(compgen -v | sort | comm -13 .docs-vars - | grep -E '^[A-Z][A-Z0-9_]*$' | grep -Ev \"$SHELL_VARS\" || true)\n"
            '  if [ -n "$n" ]; then declare -p $n >> .docs-state; fi; }\ntrap __save EXIT\n'
            f"{code}"
        )
        done = subprocess.run(["bash", "-c", script], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (
            f"{block} exited {done.returncode}:\n{code}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        )
        return done.stdout

    def stop(self) -> None:
        if self.server:
            self.server.stop()


@pytest.mark.slow
def _runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.marker in ("run", "server")]


@pytest.mark.parametrize("page", [p for p in TESTED_PAGES if _runnable(p)], ids=lambda p: str(p.relative_to(REPO)))
def test_the_commands_of_the_page_run_and_print_what_it_shows(page: Path, real_store, tmp_path: Path) -> None:
    """Pages without a runnable block (the console's has screenshots, no commands; the export's one command
    takes minutes and is marked not-run, listed by the not-run test) are not parametrized: nothing here skips."""
    runnable = _runnable(page)
    photos = SHARED_DATA / "val"
    has_photos = photos.is_dir()
    work = tmp_path / "work"
    work.mkdir()
    if has_photos:
        _photos(work)
    runner = Page(page, work, _store_copy(real_store.root, tmp_path / "store"))
    skipped: list[str] = []
    try:
        if not any(b.marker == "server" for b in runnable):
            runner.start()  # a page that assumes the quick start's server
        for block in runnable:
            if block.marker == "server":
                runner.start()
                continue
            if "photos" in block.args.split() and not has_photos:
                skipped.append(str(block))
                continue
            out = runner.run(block)
            if block.expected:
                check_output(block, out)
    finally:
        runner.stop()
    if skipped:
        pytest.skip(f"{SHARED_DATA} is absent (real photos live in ../shared): not run: {', '.join(skipped)}")


# --- names: everything the docs name exists, everything that exists is documented ------------------------------
def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in ALL_PAGES if "_generated" not in p.parts)


def _generated_text() -> str:
    return "\n".join((gen.OUT / name).read_text() for name in gen.FRAGMENTS)


def test_every_setting_named_in_the_docs_exists_and_every_setting_is_documented() -> None:
    from app.core.settings import Settings

    real = {f"TLSERVE_{name.upper()}" for name in Settings.model_fields}
    named = set(re.findall(r"\bTLSERVE_[A-Z0-9_]+\b", _docs_text() + (REPO / "SECURITY.md").read_text()))
    not_settings = {"TLSERVE_URL", "TLSERVE_API_KEY", "TLSERVE_LB_PORT", "TLSERVE_SHARED_DATA"}  # client, compose, tests
    assert named - real - not_settings == set(), "the docs name settings that do not exist"
    assert real - set(re.findall(r"\bTLSERVE_[A-Z0-9_]+\b", (gen.OUT / "settings.md").read_text())) == set()


def test_every_cli_command_and_flag_named_in_the_docs_exists() -> None:
    commands, options = gen.cli_names()
    subcommands = {c.split()[1] for c in commands if c != "tlserve"}
    text = _docs_text()
    wrong = []
    for m in re.finditer(r"(?<![\w/.-])tlserve ([a-z][a-z-]*)((?: [^\n`|#;&)]*)?)", text):
        sub, rest = m.group(1), m.group(2)
        if sub not in subcommands:
            if sub in ("bench",):  # the one a contradiction named: must not come back
                wrong.append(m.group(0))
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if (f"tlserve {sub}", flag) not in options and ("tlserve", flag) not in options:
                wrong.append(f"tlserve {sub} … {flag}")
    assert not wrong, f"the docs name commands or flags the CLI does not have: {sorted(set(wrong))}"
    undocumented = [c for c in commands if f"## `{c}`" not in (gen.OUT / "cli.md").read_text()]
    assert not undocumented


def test_every_route_named_in_the_docs_exists_and_every_route_is_documented() -> None:
    paths = set(gen.openapi()["paths"])
    extra = {"/ui", "/ui/", "/openapi.json", "/docs", "/redoc"}  # served outside the schema (app/api/console.py, FastAPI)
    shape = {re.sub(r"\{[^}]+\}", "{}", p) for p in paths | extra}
    wrong = []
    for m in re.finditer(r"(?<![\w.])(/(?:v1|v2|livez|readyz|metrics|ui|openapi\.json|docs|redoc)(?:/[\w{}.-]*)*)", _docs_text()):
        path = m.group(1).rstrip(".")
        if (path.endswith(("/", "…")) or "..." in path) and path not in extra:
            continue  # a prefix, not a route
        candidate = re.sub(r"\{[^}]+\}", "{}", path)
        prefix_of_route = any(s.startswith(candidate + "/") for s in shape)
        if candidate not in shape and not prefix_of_route and not re.search(r"/(pets|cats_vs_dogs|\d+)", path):
            wrong.append(path)
    assert not wrong, f"the docs name routes the app does not serve: {sorted(set(wrong))}"
    routes = (gen.OUT / "routes.md").read_text()
    assert all(f"`{p}`" in routes for p in paths)


def test_every_error_code_named_in_the_docs_exists_and_every_code_is_documented() -> None:
    codes = gen.error_codes()
    errors_page = (gen.OUT / "errors.md").read_text()
    assert all(f"`{code}`" in errors_page for code in codes)
    text = _docs_text()
    named = set(re.findall(r"\b(?:4\d\d|5\d\d) `([a-z][a-z0-9_]+)`", text))
    named |= set(re.findall(r'"code": ?"([a-z_]+)"', text))
    assert named - set(codes) == set(), "the docs name error codes that do not exist"


# --- generated references, the build, offline -------------------------------------------------------------------
def test_the_generated_reference_fragments_are_current() -> None:
    assert gen.stale() == [], "run `python -m docs.gen` (the CLI, settings, routes, errors or modules changed)"


def test_the_module_map_names_every_module_and_each_has_a_docstring() -> None:
    table = (gen.OUT / "modules.md").read_text()
    modules = [p for p in (REPO / "app").rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    assert table.count("\n| `app") == len(modules)
    assert "**no docstring**" not in table


def test_the_index_reaches_train_deploy_and_roll_back_in_one_click() -> None:
    index = (DOCS / "index.md").read_text()
    for text, target in (("Train your own head", "tutorials/first-head.md"), ("Deploy behind a load balancer", "howto/deploy.md"),
                         ("Roll back a head", "howto/versions.md")):  # fmt: skip
        assert f"[{text}]({target})" in index
        assert (DOCS / target).exists()
    assert "## Roll back a head" in (DOCS / "howto/versions.md").read_text()


def test_the_readme_is_a_short_front_door_without_measurements() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert not re.search(r"\d+(\.\d+)? ?(images/s|img/s)", readme), "measurements live in benchmarks/RESULTS.md"
    assert "tlserve bench" not in readme


@pytest.mark.slow
def test_the_site_builds_strict_and_loads_nothing_from_the_internet(tmp_path: Path) -> None:
    out = tmp_path / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html", str(DOCS), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pages = list(out.rglob("*.html"))
    assert len(pages) >= 20
    assets = re.compile(r"""<(?:script|img|link|iframe|source)\b[^>]*?\b(?:src|href)=["'](https?:)?//""", re.I)
    css_urls = re.compile(r"""url\(\s*["']?(https?:)?//""", re.I)
    remote = [str(p.relative_to(out)) for p in pages if assets.search(p.read_text(errors="replace"))]
    remote += [str(p.relative_to(out)) for p in out.rglob("*.css") if css_urls.search(p.read_text(errors="replace"))]
    remote += [
        str(p.relative_to(out))
        for p in out.rglob("*.js")
        if re.search(r"""["']https?://[^"']*\.(js|css|woff2?)["']""", p.read_text(errors="replace"))
    ]
    assert not remote, f"pages that load something from the internet: {remote}"
    for shot in gen.SHOTS.values():
        assert (out / "_images" / shot).exists(), shot
