"""`relprop report`: the numbers, the escaping, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from relprop.cli.main import main
from relprop.report import build_report, conservation_points, read_run, summarize

from sharedfiles import shared_path

NASTY_FILE = 'we<ird> "name" & <img src=x onerror=alert(1)>.png'
CLASS_NAMES = ["cat & dog", "<b>bold</b>", "plain"]
SKIPPED_FILE = "bad <script>alert(2)</script>.png"
SKIPPED_REASON = "5000x3 pixels: aspect ratio 1667:1 is above the limit of 8:1"
METHODS = ("ours", "gradcam", "ig")


def make_eval_out(root: Path, n: int = 24, maps: bool = True, seed: int = 0) -> Path:
    """A small evaluate output folder following the results format (results.jsonl, run.json, maps/)."""
    rng = np.random.default_rng(seed)
    data, out = root / "data", root / "eval"
    yy, xx = np.mgrid[0:32, 0:32]
    records = []
    for i in range(n):
        label = i % 3
        rel = f"c{label}/{NASTY_FILE if i == 1 else f'img_{i:03d}.png'}"
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        picture = np.stack([xx * 8, yy * 8, np.full_like(xx, 80 * label)], -1).astype(np.uint8)
        Image.fromarray(picture).save(data / rel)
        for method in METHODS:
            ins, dele = rng.uniform(0.3, 0.9), rng.uniform(0.0, 0.4)
            record = {
                "checkpoint": "model.pt", "image": rel, "label": label, "pred": (label + i % 2) % 3,
                "method": method, "protocol": "paper", "insertion": ins, "deletion": dele,
                "id": ins - dele,
                "insertion_curve": list(np.linspace(0.1, 0.9, 3 + i % 4) ** (1 + i % 3)),
                "deletion_curve": list(np.linspace(0.9, 0.1, 3) ** (1 + i % 2)),
                "localization": {"pointing": float(i % 2), "energy": rng.uniform(0, 1),
                                 "centre_pointing": float(i % 3 == 0), "centre_energy": rng.uniform(0, 1)},
                "conservation": None,
            }
            if method == "ours":
                p = rng.uniform(0.2, 1.0)
                record["conservation"] = {
                    "output": p, "input": p * 0.99, "last_block": p * 0.999,
                    "last_block_name": "layer4.1", "first_block": p * 0.995,
                    "first_block_name": "layer1.0", "input_over_output": 0.99,
                }
            records.append(record)
            if maps:
                heat = np.sin(xx / (2 + i % 3) + (method == "ig")) * np.cos(yy / 5.0)
                (out / "maps" / method).mkdir(parents=True, exist_ok=True)
                np.save(out / "maps" / method / f"{Path(rel).stem}.npy", heat.astype(np.float32))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    skipped = [{"checkpoint_sha256": "abc", "image": f"c0/{SKIPPED_FILE}", "error": SKIPPED_REASON},
               {"image": "c0/img_000.png", "error": "unreadable in an earlier run, evaluated since"}]
    (out / "skipped.jsonl").write_text("".join(json.dumps(s) + "\n" for s in skipped), encoding="utf-8")
    run = {"settings": {"data": str(data), "preprocessing": [{"resize": 32, "crop": None}]},
           "labels": {"classes": ["c0", "c1", "c2"], "class_names": CLASS_NAMES},
           "command": ["relprop", "evaluate", "--data", str(data)]}
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    eval_out = make_eval_out(root)
    assert main(["report", str(eval_out), "--out", str(root / "report"), "--page-size", "10"]) == 0
    return eval_out, root / "report"


def _mean(eval_out: Path, method: str, key: str) -> float:
    rows = [json.loads(line) for line in (eval_out / "results.jsonl").read_text().splitlines()]
    return float(np.mean([r[key] for r in rows if r["method"] == method]))


def test_summary_numbers_match_the_results(report: tuple[Path, Path]) -> None:
    eval_out, _ = report
    columns, rows = summarize(read_run(eval_out).records)
    assert [r.method for r in rows] == list(METHODS)
    assert {"insertion", "deletion", "id", "loc:pointing", "conservation error"} <= set(columns)
    for row in rows:
        assert row.count == 24
        assert row.scores["id"][0] == pytest.approx(_mean(eval_out, row.method, "id"))
        assert row.scores["insertion"][0] == pytest.approx(_mean(eval_out, row.method, "insertion"))
    ours = rows[0].scores["conservation error"][0]
    assert ours == pytest.approx(0.01)  # input = 0.99 x output in every record
    assert np.isnan(rows[1].scores["conservation error"][0])  # Grad-CAM has no conservation


def test_conservation_panels_have_one_point_per_image(report: tuple[Path, Path]) -> None:
    eval_out, _ = report
    panels = conservation_points(read_run(eval_out).records)
    assert list(panels) == ["last residual block (layer4.1)", "first residual block (layer1.0)",
                            "input"]
    for methods in panels.values():
        assert list(methods) == ["ours"] and len(methods["ours"]) == 24
    x, y = np.asarray(panels["input"]["ours"]).T
    np.testing.assert_allclose(y, 0.99 * x)


def test_page_is_offline_escaped_and_complete(report: tuple[Path, Path]) -> None:
    _, out = report
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "<img src=x" not in page and "<b>bold</b>" not in page  # only escaped forms
    assert "&lt;b&gt;bold&lt;/b&gt;" in page or "\\u003cb\\u003ebold" in page
    for src in ("plots/curves_0.png", "plots/conservation.png"):
        assert f'src="{src}"' in page and Image.open(out / src).size[0] > 300
    thumbs = sorted((out / "img").rglob("*.png"))
    assert len(thumbs) == 24 * (1 + len(METHODS))
    assert Image.open(thumbs[0]).size == (32, 32)


def test_without_saved_maps_the_report_says_how_to_get_them(tmp_path: Path) -> None:
    eval_out = make_eval_out(tmp_path, n=3, maps=False)
    index = build_report(eval_out, tmp_path / "r")
    page = index.read_text(encoding="utf-8")
    assert 'id="no-maps"' in page and "--save-maps" in page
    assert not list((tmp_path / "r" / "img").rglob("m*.png"))  # originals only


def test_missing_or_empty_eval_folder_is_one_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 1
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "results.jsonl" in err and err.count("\n") == 1


def test_help_reads_like_a_man_page(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    for part in ("EVAL_OUT", "--out REPORT_DIR", "examples:", "exit status:", "--save-maps"):
        assert part in text


# ------------------------------------------------------------------ real browser


def _chromium() -> str | None:
    for name in (os.environ.get("RELPROP_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (no extra packages)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire() -> None:  # in the child: the protocol wants fds 3 (read) and 4 (write)
            read_fd = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            write_fd = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(read_fd, 3)
            os.dup2(write_fd, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--no-first-run", "--no-default-browser-check",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,1600",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._read(deadline - time.monotonic())
            self.events.append(message)
            if message.get("method") == event:
                return message
        raise TimeoutError(event)

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (not element.click())."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                      "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine: install it (Debian: apt-get install chromium) "
                    "or point RELPROP_CHROMIUM at a Chrome/Chromium binary")
    instance = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield instance
    finally:
        instance.close()


def _column(browser: Browser, index: int) -> list[str]:
    return browser.js(f"Array.from(document.querySelectorAll('#summary tbody tr'))"
                      f".map(r => r.cells[{index}].dataset.value)")


def test_report_in_a_real_browser(report: tuple[Path, Path], browser: Browser,
                                  tmp_path: Path) -> None:
    eval_out, out = report
    browser.open((out / "index.html").as_uri())

    # every image on the page (and every gallery image, made eager) loads from local files
    sizes = browser.js("Promise.all(Array.from(document.images).map(i => { i.loading = 'eager';"
                       " return i.decode().then(() => i.naturalWidth, () => 0); }))")
    assert len(sizes) == 2 + 10 * (1 + len(METHODS)) and min(sizes) > 0
    urls = [e["params"]["request"]["url"] for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(url.startswith(("file://", "data:")) for url in urls), urls
    assert not any(e.get("method") == "Page.javascriptDialogOpening" for e in browser.events)

    # the escaped file name is shown as text, and did not become an element
    captions = browser.js("Array.from(document.querySelectorAll('.caption')).map(e => e.textContent)")
    assert f"c1/{NASTY_FILE}" in captions
    assert browser.js("document.querySelectorAll('img[src=\"x\"]').length") == 0

    # a click on the "id" heading sorts the table by mean ID, again reverses it
    headings = browser.js("Array.from(document.querySelectorAll('#summary th')).map(h => h.textContent)")
    id_column = headings.index("id")
    expected = sorted(METHODS, key=lambda m: _mean(eval_out, m, "id"))
    browser.click(f"#summary th:nth-child({id_column + 1})")
    assert _column(browser, 0) == expected
    values = [float(v) for v in _column(browser, id_column)]
    assert values == sorted(values)
    browser.click(f"#summary th:nth-child({id_column + 1})")
    assert _column(browser, 0) == expected[::-1]

    # the gallery pages: 24 images at 10 per page
    assert browser.js("document.getElementById('page-info').textContent").startswith("page 1 of 3")
    browser.click("#next")
    assert browser.js("document.getElementById('page-info').textContent").startswith("page 2 of 3")
    assert browser.js("document.querySelector('.caption').textContent") == "c1/img_010.png"

    browser.js("window.scrollTo(0, 0)")
    browser.screenshot(tmp_path / "report.png")
    assert Image.open(tmp_path / "report.png").size[0] >= 1000


@pytest.mark.slow
def test_report_of_a_real_evaluate_run(tmp_path: Path) -> None:
    """Through the real `relprop evaluate`: its files are what the report reads."""
    weights = shared_path("models", "resnet18_tin10.pt")
    data = shared_path("data", "tin10", "val")
    eval_out = tmp_path / "eval"
    main(["evaluate", "--weights", str(weights), "--data", str(data), "--limit", "2",
          "--methods", "ours,gradient", "--save-maps", "--device", "cpu", "--out", str(eval_out)])
    assert main(["report", str(eval_out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "goldfish" in page  # class names from the checkpoint, as labels
    assert 'id="no-maps"' not in page and "Original images not found" not in page
    assert len(list((tmp_path / "report" / "img").rglob("m*.png"))) == 2 * 2
    assert len(list((tmp_path / "report" / "img").rglob("orig.png"))) == 2
    panels = conservation_points(read_run(eval_out).records)
    assert list(panels) == ["last residual block (layer4.1)", "first residual block (layer1.0)",
                            "input"]
    x, y = np.asarray(panels["input"]["ours"]).T
    np.testing.assert_allclose(y, x, rtol=1e-3)  # relprop's LRP conserves relevance


def test_skipped_images_are_listed_with_their_reasons(report: tuple[Path, Path]) -> None:
    _, out = report
    page = (out / "index.html").read_text(encoding="utf-8")
    section = page[page.index('id="skipped"'):page.index("<h2>Insertion")]
    assert "Skipped images (1)" in section
    assert html_escape(f"c0/{SKIPPED_FILE}") in section and html_escape(SKIPPED_REASON) in section
    assert "<script>alert(2)" not in page
    assert "img_000.png" not in section  # skipped once, evaluated since: no longer listed


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_summary_table_fits_1400_px_without_scrolling(report: tuple[Path, Path], browser: Browser,
                                                       tmp_path: Path) -> None:
    _, out = report
    browser.open((out / "index.html").as_uri())
    browser.send("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1,
                 mobile=False)
    assert browser.js("window.innerWidth") == 1400
    columns = browser.js("document.querySelectorAll('#summary thead th').length")
    assert columns == 3 + 3 + 4 + 1  # method, protocol, images; ins, del, id; 4 loc.; conservation
    box = browser.js("(() => { const t = document.getElementById('summary'), s = t.parentElement;"
                     " return {scroll: s.scrollWidth, client: s.clientWidth,"
                     " right: t.getBoundingClientRect().right, width: window.innerWidth}; })()")
    assert box["scroll"] <= box["client"], box
    assert box["right"] <= box["width"], box
    skipped = browser.js("document.querySelector('table.skipped tbody').textContent")
    assert f"c0/{SKIPPED_FILE}" in skipped and SKIPPED_REASON in skipped
    browser.js("document.getElementById('summary-h').scrollIntoView()")
    shot = Path(os.environ.get("RELPROP_SCREENSHOTS", tmp_path)) / "report-summary-1400.png"
    browser.screenshot(shot)
    assert Image.open(shot).size == (1400, 900)
