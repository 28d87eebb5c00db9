"""Regenerate the README's screenshots by running the README's own commands, then headless Chromium.

    python tools/make_docs_images.py                 # needs ../shared and Chromium (.ci/run installs it)
    python tools/make_docs_images.py --skip-evaluate # the explain pictures only (the report needs
                                                     # the evaluate run: minutes on a CPU)

The commands are read from README.md (the blocks that write runs/first, runs/photos, runs/tin10 and
runs/tin10-report), so a picture always shows what the documented command makes; they run in a
scratch folder beside a `shared` link, as from the repository root. Chromium is found as
`RELPROP_CHROMIUM`, `chromium`, `chromium-browser` or `google-chrome`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
# picture -> (the --out of the README command that makes it, the file it is in that folder)
PICTURES = {
    "first-five-tin10.png": ("runs/first", "overview.png"),
    "first-five-overlay.png": ("runs/first", "val_6457/ours.png"),
    "first-five-any-photo.png": ("runs/photos", "overview.png"),
}
REPORT = "runs/tin10-report"
SCREENSHOTS = {"first-five-report.png": "", "first-five-report-gallery.png": "Gallery"}


def readme_commands() -> list[str]:
    """Every `relprop ...` command of the README's console and bash blocks, continuations joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for body in re.findall(r"^```(?:console|bash)\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.removeprefix("$ ").split("#")[0].strip()
            if line.startswith("relprop "):
                commands.append(line)
    return commands


def command_for(out: str, commands: list[str]) -> list[str]:
    """The README command whose --out is `out` (or, for the report, whose output it is)."""
    for command in commands:
        argv = shlex.split(command)
        if "--out" in argv and argv[argv.index("--out") + 1] == out:
            return argv
    raise SystemExit(f"README.md has no relprop command with --out {out}")


def save_small(source: Path, target: Path) -> None:
    """The picture with a 256-colour palette: a quarter of the bytes, no visible change."""
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            target, optimize=True)


def run(argv: list[str], cwd: Path) -> None:
    print("$", shlex.join(argv), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "relprop", *argv[1:]], cwd=cwd, env=env, check=True)


def chromium() -> str:
    for name in (os.environ.get("RELPROP_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and shutil.which(name):
            return str(shutil.which(name))
    raise SystemExit("no Chromium: install it (Debian: apt-get install chromium) or set RELPROP_CHROMIUM")


def screenshot(binary: str, page: Path, heading: str, target: Path, profile: Path) -> None:
    """The page as a 1280 x 900 window shows it once its scripts ran and its pictures loaded,
    scrolled to the h2 that starts with `heading` (none: the top). Drives Chromium over the
    DevTools pipe with the report test's `Browser` (tests/test_report.py), not a second one."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_report import Browser

    browser = Browser(binary, profile)
    try:
        browser.open(page.resolve().as_uri())
        browser.send("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                     deviceScaleFactor=1, mobile=False)
        if heading:
            browser.js("[...document.querySelectorAll('h2')].find(h => h.textContent.startsWith("
                       f"{heading!r})).scrollIntoView()")
        browser.js("Promise.race([new Promise(r => setTimeout(r, 5000)), "  # lazy ones never load
                   "Promise.all([...document.images].map(i => i.complete ? 0 : "
                   "new Promise(r => { i.onload = r; i.onerror = r; })))])")
        browser.screenshot(target)
    finally:
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                        help="the example data folder (default: ../shared)")
    parser.add_argument("--skip-evaluate", action="store_true", help="the explain pictures only")
    parser.add_argument("--report-only", action="store_true", help="the report pictures only")
    parser.add_argument("--work", type=Path, help="run in this folder and keep it (a rerun resumes "
                        "the evaluation); default: a temporary folder")
    args = parser.parse_args()
    if not args.shared.is_dir():
        raise SystemExit(f"{args.shared}: no example data folder")
    binary = None if args.skip_evaluate else chromium()
    commands = readme_commands()
    with tempfile.TemporaryDirectory(prefix="relprop-docs-") as scratch:
        top = args.work or Path(scratch)
        work = top / "repo"
        work.mkdir(parents=True, exist_ok=True)
        if not (top / "shared").exists():
            (top / "shared").symlink_to(args.shared.resolve())
        if not args.report_only:
            for out in dict.fromkeys(out for out, _ in PICTURES.values()):
                run(command_for(out, commands), work)
            for name, (out, file) in PICTURES.items():
                save_small(work / out / file, IMG / name)
                print(f"wrote docs/img/{name}")
        if binary is None:
            return
        report = command_for(REPORT, commands)
        run(command_for(report[2], commands), work)  # `relprop report RUN --out ...`: RUN's evaluate
        run(report, work)
        for name, heading in SCREENSHOTS.items():
            screenshot(binary, work / REPORT / "index.html", heading, top / name, top / name.replace(".png", "-profile"))
            save_small(top / name, IMG / name)
            print(f"wrote docs/img/{name}")


if __name__ == "__main__":
    main()
