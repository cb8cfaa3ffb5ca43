"""Headless Chromium for report tests: render a page, dump its DOM, read which images loaded.

The report marks every ``<img>`` with ``data-loaded="1"`` / ``"0"`` once the page has loaded
(:mod:`spear.evaluation.report`); :func:`image_marks` reads the marks back from a dumped DOM.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.fail("Chromium is a set-up requirement of the report tests (it renders the HTML report): install it "
                "with `apt-get install -y chromium` on Debian/Ubuntu (the bootstrap script does this).")


def run_chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page`` with its own ``profile`` folder and extra ``args`` (--dump-dom, --screenshot=...)."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def dump_dom(page: Path, profile: Path) -> str:
    """The page's DOM after load (scripts run), from headless Chromium."""
    return run_chromium(page, profile, "--dump-dom", "--virtual-time-budget=10000").stdout


def image_marks(dom: str) -> dict[str, str]:
    """src -> data-loaded ("1" / "0", "unmarked") of every <img> in a dumped DOM."""
    marks = {}
    for tag in re.findall(r"<img\b[^>]*>", dom):
        src = re.search(r'src="([^"]+)"', tag).group(1)
        loaded = re.search(r'data-loaded="([01])"', tag)
        marks[src] = loaded.group(1) if loaded else "unmarked"
    return marks
