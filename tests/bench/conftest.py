"""Bench scripts imported as modules, as ``python bench/NAME.py`` resolves their sibling imports."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


@pytest.fixture(scope="session")
def bench_module():
    """``bench_module("gpu_check")``: bench/gpu_check.py as a module (bench/ goes last on sys.path, so it
    shadows nothing installed)."""
    if BENCH not in sys.path:
        sys.path.append(BENCH)
    return importlib.import_module
