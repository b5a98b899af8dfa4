"""The web console (/ui) in a real browser: Debian's headless Chromium driven by Selenium through
chromedriver, against real ``tlserve serve`` processes on loopback. The tests act as a person does —
file paths typed into file inputs, clicks, reading what the page shows — and never call the API from
injected script. Screenshots of every step land in ``tests/artifacts/console/`` (gitignored)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from app.api.console import ASSETS
from app.storage.store import ModelStore
from tests.helpers import ADMIN_KEY, REPO, ServerProcess, image_bytes
from tests.test_versions import add_version

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # the dev extra has it; without it the browser tests skip
    webdriver = None  # type: ignore[assignment]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT = "apt-get install -y chromium chromium-driver"
ARTIFACTS = REPO / "tests" / "artifacts" / "console"
CONSOLE = REPO / "app" / "console"
XSS = "<img src=x onerror=document.title='pwned'>"
TITLE = "tlserve console"


class Page:
    """One browser tab on the console: find, type, click, wait for text, screenshot."""

    def __init__(self, driver: webdriver.Chrome, name: str) -> None:
        self.driver = driver
        self.name = name
        self.step = 0
        self.wait_for = lambda timeout=30: WebDriverWait(driver, timeout, poll_frequency=0.1)

    def open(self, server: ServerProcess) -> None:
        self.driver.get(f"{server.url}/ui")  # the redirect to /ui/ included
        self.wait_for().until(lambda _: self.text("#heads-status") not in ("", "Loading heads…"))

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.find(css).text

    def type(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def files(self, css: str, paths: list[Path]) -> None:
        self.find(css).send_keys("\n".join(str(p) for p in paths))

    def click(self, css: str) -> None:
        self.find(css).click()

    def wait_text(self, css: str, needle: str, timeout: float = 30) -> str:
        """Wait until the element at ``css`` shows ``needle``; its text then."""

        def shows(_: object) -> str | bool:
            try:
                text = self.text(css)
            except (NoSuchElementException, StaleElementReferenceException):
                return False
            return text if needle in text else False

        try:
            return self.wait_for(timeout).until(shows)
        except TimeoutException:
            self.shot("timeout")
            shown = [e.text for e in self.all(css)]
            raise AssertionError(f"{css!r} never showed {needle!r} in {timeout}s; it shows {shown!r}") from None

    def shot(self, what: str) -> None:
        self.step += 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(ARTIFACTS / f"{self.name}-{self.step:02d}-{what}.png"))

    def problems(self) -> list[str]:
        """Errors the page raised or the browser refused (CSP violations among them); the API's own 4xx
        answers, which the browser logs as failed loads, are what the tests provoke and are left out."""
        answered = "Failed to load resource: the server responded with a status of 4"
        return [e["message"] for e in self.driver.get_log("browser")
                if e["level"] == "SEVERE" and answered not in e["message"] and "favicon" not in e["message"]]  # fmt: skip

    def assert_no_injection(self) -> None:
        assert self.driver.title == TITLE  # an onerror handler that ran would have renamed the tab
        assert self.all("img[src='x']") == []  # the payload is text, never an element


@pytest.fixture
def page(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is absent: {APT}")
    if webdriver is None:
        pytest.skip("selenium is absent: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-default-apps",
                 "--metrics-recording-only", "--disable-extensions", "--window-size=1280,2400",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: Selenium Manager (which would download drivers) is never run.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")), options=options)
    try:
        yield Page(driver, request.node.name)
    finally:
        driver.quit()


def red_photo(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15))
    return path


def classify(page: Page, photos: list[Path], head: str | None = None) -> None:
    if head is not None:
        Select(page.find("#classify-head")).select_by_value(head)
    page.files("#classify-files", photos)


# --- served files: headers and the markup itself (no browser needed) ---------------------------------


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline_scripts = 0
        self.handlers: list[str] = []
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.handlers += [f"{tag} {k}" for k in names if k.startswith("on")]
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        self._in_script = tag == "script" and "src" not in names

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


def test_console_files_carry_a_csp_without_inline_script_and_no_key_is_needed(
    tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(
        tiny_store, default_head="colors", api_keys="k-infer", admin_keys="k-admin"
    )  # the page itself holds no secret
    r = httpx.get(f"{server.url}/ui")
    assert r.status_code == 307 and r.headers["location"] == "ui/"
    for name, media_type in {"": "text/html", **ASSETS}.items():
        r = httpx.get(f"{server.url}/ui/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] == media_type.split(";")[0], name
        assert r.headers["x-content-type-options"] == "nosniff"
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert csp["script-src"] == "'self'" and csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
        assert "unsafe" not in r.headers["content-security-policy"]
    r = httpx.get(f"{server.url}/ui/settings.py")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "index.html" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/ui/..%2Fmain.py").status_code == 404
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API behind it still wants its key

    markup = _Markup()
    markup.feed((CONSOLE / "index.html").read_text())
    assert markup.inline_scripts == 0 and markup.handlers == []
    assert all(not re.match(r"^(https?:)?//", url) for url in markup.urls), markup.urls  # nothing from the internet
    for path in sorted(CONSOLE.glob("*.js")):
        assert path.name in ASSETS, f"{path.name} is not served (app/api/console.py ASSETS)"
        code = path.read_text()
        # user text goes in with textContent / text nodes; nothing parses strings as HTML or code
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in code, f"{path.name} uses {sink}"
        assert "http://" not in code and "https://" not in code, path.name


# --- in the browser, against today's routes (tiny store: fast) ----------------------------------------


def use_admin_key(page: Page) -> None:
    """Type the test servers' admin key (tests/helpers.py ADMIN_KEY) as a person would, and keep it for the tab."""
    page.type("#admin-key", ADMIN_KEY)
    page.click("#keys-save")
    page.wait_text("#keys-status", "Keys kept for this tab: admin key")


def test_console_asks_for_the_admin_key_when_an_admin_operation_is_refused(
    page: Page, fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    add_version(fresh_tiny_store)
    server = server_factory(fresh_tiny_store, default_head="colors", admin_keys="")  # no admin key set at all
    page.open(server)
    page.wait_text("#heads-list", "Versions of colors")
    page.click("[data-head='colors'] tr[data-version='2'] button.promote")
    message = page.wait_text("[data-head='colors'] .head-status", "Error 403 (admin_disabled)")
    assert "TLSERVE_ADMIN_KEYS" in message
    field = page.find("#admin-key")
    assert field.get_attribute("aria-invalid") == "true" and page.driver.switch_to.active_element == field
    page.shot("admin-disabled")
    assert page.problems() == []


def test_console_classifies_promotes_and_rolls_back_showing_hostile_names_as_text(
    page: Page, fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    add_version(fresh_tiny_store, flip=True)  # version 2 answers blue for red photos; not promoted
    server = server_factory(fresh_tiny_store, default_head="colors")
    page.open(server)
    use_admin_key(page)
    page.wait_text("#heads-list", "Versions of colors")
    rows = page.all("[data-head='colors'] table.versions tbody tr")
    assert [r.get_attribute("data-version") for r in rows] == ["1", "2"]
    assert "current" in rows[0].text and re.search(r"\d+\.\d%", rows[0].text)  # its accuracy, from the card
    assert "Confusion matrix" in page.text("[data-head='colors'] .version-report[data-version='1']")
    page.shot("heads")

    photo = red_photo(tmp_path / "photos", f"{XSS}.png")
    classify(page, [photo])
    page.wait_text("#classify-status", "classified by colors version 1")
    result = page.find("#classify-results .result")
    assert page.text("#classify-results .result .file") == f"{XSS}.png"  # the file name, as text
    assert page.text("#classify-results .result .label") == "red"
    assert len(result.find_elements("css selector", ".bars progress")) == 2  # both classes' bars (top 3 of 2)
    assert "answered by colors version 1" in result.text
    assert result.find_element("css selector", "img").get_attribute("src").startswith("blob:")  # the thumbnail
    page.assert_no_injection()
    page.shot("classified-v1")

    page.click("[data-head='colors'] tr[data-version='2'] button.promote")
    page.wait_text("[data-head='colors'] .head-status", "Promoted: version 2 is current, version 2 served")
    page.shot("promoted-v2")
    classify(page, [photo])
    page.wait_text("#classify-status", "classified by colors version 2")
    assert page.text("#classify-results .result .label") == "blue"

    page.click("[data-head='colors'] button.rollback")
    page.wait_text("[data-head='colors'] .head-status", "Rolled back: version 1 is current")
    classify(page, [photo])
    page.wait_text("#classify-status", "classified by colors version 1")
    assert page.text("#classify-results .result .label") == "red"
    page.shot("rolled-back")

    # a pinned version that does not exist: the API's 404 message, which lists the versions that do
    page.type("#classify-version", "9")
    classify(page, [photo])
    assert "versions: 1, 2" in page.wait_text("#classify-status", "Error 404 (version_not_found)")
    page.assert_no_injection()
    assert page.problems() == []  # no script error, no CSP refusal


def test_console_with_api_keys_shows_the_401_then_works_once_keys_are_entered(
    page: Page, fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    add_version(fresh_tiny_store)
    server = server_factory(fresh_tiny_store, default_head="colors", api_keys="k-infer", admin_keys="k-admin")
    page.open(server)
    message = page.wait_text("#heads-status", "Error 401 (unauthorized)")
    assert "missing or invalid API key" in message
    photo = red_photo(tmp_path / "photos", "red.png")
    classify(page, [photo])
    page.wait_text("#classify-status", "Error 401 (unauthorized): missing or invalid API key")
    page.shot("no-key")

    page.type("#api-key", "k-infer")
    page.click("#keys-save")
    page.wait_text("#keys-status", "Keys kept for this tab: API key")
    page.wait_text("#heads-list", "Versions of colors")
    classify(page, [photo], head="colors")
    page.wait_text("#classify-status", "classified by colors version 1")
    page.click("[data-head='colors'] tr[data-version='2'] button.promote")
    page.wait_text("[data-head='colors'] .head-status", "Error 403 (forbidden): this operation needs an admin key")
    page.shot("inference-key-promote-403")

    page.type("#admin-key", "k-admin")
    page.click("#keys-save")
    page.wait_text("#keys-status", "API key and admin key")
    page.wait_text("#heads-list", "Versions of colors")
    page.click("[data-head='colors'] tr[data-version='2'] button.promote")
    page.wait_text("[data-head='colors'] .head-status", "Promoted: version 2 is current")
    page.driver.refresh()  # the keys live in this tab's sessionStorage
    page.wait_text("#heads-list", "Versions of colors")
    assert page.find("#api-key").get_attribute("value") == "k-infer"
    page.shot("admin-key-promoted")
    page.click("#keys-forget")
    page.wait_text("#heads-status", "Error 401 (unauthorized)")
    assert page.problems() == []


# --- the done-when flow: the real VGG16 export, real photos, training over HTTP ------------------------


@pytest.fixture
def empty_real_store(real_store: ModelStore, tmp_path: Path) -> ModelStore:
    """The real export with only the default head, in a writable folder of this test's own."""
    root = tmp_path / "store"
    (root / "heads").mkdir(parents=True)
    for path in [real_store.manifest_path, *real_store.root.glob("*.onnx")]:
        try:
            (root / path.name).hardlink_to(path)  # read-only use: a link saves copying 59 MB
        except OSError:
            shutil.copy(path, root / path.name)
    shutil.copytree(real_store.heads.root / "cats_vs_dogs", root / "heads" / "cats_vs_dogs")
    return ModelStore(root)


def pick(shared: Path, split: str, label: str, start: int, n: int) -> list[Path]:
    return sorted((shared / split / label).glob("*.jpg"))[start : start + n]


@pytest.mark.e2e
@pytest.mark.slow
def test_console_creates_a_head_from_photos_classifies_retrains_compares_and_rolls_back(
    page: Page, empty_real_store: ModelStore, shared_data: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(empty_real_store)
    page.open(server)
    use_admin_key(page)
    page.wait_text("#heads-list", "Versions of cats_vs_dogs")
    page.shot("empty-store")

    # a person's mistakes are named before anything is sent; hostile names come back from the API as text
    page.click("#train-start")
    page.wait_text("#train-status", "Error: give the head a name")
    page.type("#train-name", "pets")
    page.click("#train-start")
    page.wait_text("#train-status", "Error: add at least one class with photos")
    page.type("#train-name", XSS)
    page.type("[data-class='1'] .class-label", XSS)
    page.files("[data-class='1'] .class-files", pick(shared_data, "train", "cat", 0, 6))
    page.type("[data-class='2'] .class-label", "dog")
    page.files("[data-class='2'] .class-files", pick(shared_data, "train", "dog", 0, 6))
    assert page.text("[data-class='1'] .count") == "6 photos"
    page.click("#train-start")
    message = page.wait_text("#train-status", "Error 4")
    page.shot("hostile-head-name-refused")
    assert XSS in message, message
    page.assert_no_injection()
    page.type("#train-name", "pets")
    page.click("#train-start")
    message = page.wait_text("#train-status", "invalid class label")
    assert "Error 422" in message and XSS in message, message
    page.assert_no_injection()
    page.shot("hostile-label-refused")

    page.type("[data-class='1'] .class-label", "cat")
    page.click("#train-start")
    page.wait_text("#train-job .job-state", "State: ")
    page.shot("job-started")
    page.wait_text("#train-job .job-state", "State: succeeded", timeout=600)
    assert "Version 1 created and served" in page.text("#train-job .job-version")
    accuracy = page.text("#train-job .report .accuracy")
    assert re.match(r"Accuracy \d+\.\d% \(\d+ training photos, \d+ validation photos\)", accuracy), accuracy
    cm = page.find("#train-job .report table.cm")
    assert [c.text for c in cm.find_elements(By.CSS_SELECTOR, "thead th")][1:] == ["cat", "dog"]
    assert page.text("[data-class='1'] .count") == "0 photos"  # kept in the head's examples, not sent again
    page.wait_text("#heads-list", "Versions of pets")
    page.shot("trained-v1")

    classify(page, pick(shared_data, "val", "cat", 0, 1) + pick(shared_data, "val", "dog", 0, 1), head="pets")
    page.wait_text("#classify-status", "2 photos classified by pets version 1")
    assert [e.text for e in page.all("#classify-results .result .label")] == ["cat", "dog"]
    page.shot("classified-v1")

    # more examples without training (corrections, say), then a retraining with a few more photos: only
    # the new ones are dropped each time; the earlier ones come from the head's example store
    page.files("[data-class='1'] .class-files", pick(shared_data, "train", "cat", 6, 2))
    page.files("[data-class='2'] .class-files", pick(shared_data, "train", "dog", 6, 2))
    page.click("#train-examples")
    page.wait_text("#train-status", "Added 4 photos (0 already there); pets now has")
    assert page.text("[data-class='2'] .count") == "0 photos"
    page.shot("examples-added")
    page.files("[data-class='1'] .class-files", pick(shared_data, "train", "cat", 8, 2))
    page.files("[data-class='2'] .class-files", pick(shared_data, "train", "dog", 8, 2))
    page.click("#train-start")
    page.wait_text("#train-job .job-state", "State: succeeded", timeout=600)
    assert "Version 2 created and served" in page.text("#train-job .job-version")
    trained = re.search(r"(\d+) training photos, (\d+) validation", page.text("#train-job .report .accuracy"))
    first = re.search(r"(\d+) training photos, (\d+) validation", accuracy)
    assert trained and first and int(trained[1]) == int(first[1]) + 8 and trained[2] == first[2]  # the same fixed validation set
    page.wait_text("[data-head='pets'] .summary", "current version 2, serving version 2")
    page.shot("trained-v2")

    page.click("[data-head='pets'] button.compare")
    compared = page.wait_text("[data-head='pets'] .compare-out", "Both scored on the same")
    assert "Version 1" in compared and "Version 2" in compared
    page.shot("compared")

    page.click("[data-head='pets'] button.rollback")
    page.wait_text("[data-head='pets'] .head-status", "Rolled back: version 1 is current")
    classify(page, pick(shared_data, "val", "cat", 1, 1), head="pets")
    page.wait_text("#classify-status", "classified by pets version 1")
    assert page.text("#classify-results .result .label") == "cat"
    page.shot("rolled-back")
    page.assert_no_injection()
    assert page.problems() == []


# --- the review queue from production (app/serving/review.py): tiny store, photos made here ------------------------


def test_console_reviews_unfamiliar_and_uncertain_photos_labels_two_and_retrains_on_them(
    page: Page, fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    import time

    from tests.helpers import ADMIN, write_color_dataset
    from tests.test_review import ENABLED, UNCERTAIN, UNFAMILIAR

    server = server_factory(fresh_tiny_store, job_heartbeat_s=0.5, **ENABLED)
    data = write_color_dataset(tmp_path / "colors-data", per_class=8)  # a first HTTP training fixes the validation set
    files = [(p.parent.name, (p.name, p.read_bytes(), "image/png")) for p in sorted(data.glob("*/*.png"))]
    job = httpx.post(f"{server.url}/v1/heads/colors/train", files=files, data={"promote": "false"}, headers=ADMIN).json()
    while job["state"] in ("queued", "running"):
        time.sleep(0.2)
        job = httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=ADMIN).json()
    assert job["state"] == "succeeded", job
    before = job["report"]["n_train"]

    page.open(server)
    use_admin_key(page)
    folder = tmp_path / "production"
    folder.mkdir()
    (folder / "odd.png").write_bytes(UNFAMILIAR)
    (folder / "unsure.png").write_bytes(UNCERTAIN)
    classify(page, [folder / "odd.png", folder / "unsure.png"], head="colors")
    page.wait_text("#classify-status", "classified by colors")
    Select(page.find("#review-head")).select_by_value("colors")
    deadline = time.monotonic() + 30
    while len(page.all("#review-items .review-item")) < 2 and time.monotonic() < deadline:
        page.click("#review-load")
        page.wait_text("#review-status", "to review for colors")
    items = page.all("#review-items .review-item")
    assert len(items) == 2, page.text("#review-status")
    assert "unfamiliar" in items[0].text and "low_confidence" in items[1].text  # most useful first
    page.wait_for().until(lambda _: all((i.find_element(By.CSS_SELECTOR, "img").get_attribute("src") or "").startswith("blob:")
                                        for i in page.all("#review-items .review-item")))  # fmt: skip
    page.shot("review-queue")
    page.find("#review-items .review-item:nth-child(1) button.pick").click()  # the other class
    page.wait_text("#review-status", "Corrected to")
    page.find("#review-items .review-item button.confirm").click()
    page.wait_text("#review-status", "Confirmed")
    assert page.all("#review-items .review-item") == []
    page.click("#review-retrain")
    message = page.wait_text("#review-status", "training photos", timeout=120)
    assert f"({before + 2} training photos)" in message, message  # the two reviewed photos trained the new version
    page.shot("retrained")
    assert page.problems() == []
