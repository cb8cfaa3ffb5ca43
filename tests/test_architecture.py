"""The architecture holds: the import-linter contracts in pyproject.toml are all kept.

The contracts (layers, models/ free of Ray and storage, schemas/ free of storage clients, no
cycles between siblings) are explained in docs/architecture.md. grimp, under import-linter,
reads imports inside functions too, so a lazy import cannot hide a break.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(tmp_path):
    lint = Path(sys.executable).with_name("lint-imports")
    exe = str(lint) if lint.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports is not installed (it is a test dependency in pyproject.toml)"
    done = subprocess.run([exe, "--no-cache", str(ROOT / "pyproject.toml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "KEPT" in done.stdout
