"""Format versions: the one check every reader of a versioned record makes, and its error.

A reader takes every version from the first up to the one it writes (older outputs stay
readable); a newer version, or a record of another kind, is a :class:`FormatError` whose
one-line message names the record and what to do.

Example::

    >>> check_version("decode record /out/decode.json", 2, supported=2)
    2
    >>> try:
    ...     check_version("decode record /out/decode.json", 3, supported=2)
    ... except FormatError as exc:
    ...     print(exc)
    decode record /out/decode.json is version 3, newer than this spear reads (1 to 2): upgrade spear
"""

from __future__ import annotations

import json
from typing import Any


class FormatError(ValueError):
    """A stored record is not in a format or version this spear reads (the message says which)."""


def check_version(what: str, found: Any, supported: int, *, oldest: int = 1) -> int:
    """``found`` as an int when ``oldest <= found <= supported``, else :class:`FormatError`."""
    try:
        version = int(found)
    except (TypeError, ValueError):
        raise FormatError(f"{what} has no readable version ({found!r})") from None
    if version > supported:
        raise FormatError(f"{what} is version {version}, newer than this spear reads ({oldest} to {supported}): "
                          "upgrade spear")
    if version < oldest:
        raise FormatError(f"{what} is version {version}, older than this spear reads ({oldest} to {supported}): "
                          "re-create it with this spear")
    return version


def parse_json_object(what: str, text: str, error: type[FormatError] = FormatError) -> dict[str, Any]:
    """The JSON object in ``text``; ``error`` (one line naming ``what``) for invalid JSON or another JSON value.

    >>> parse_json_object("manifest 3.json", '{"seq": 3}')
    {'seq': 3}
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise error(f"{what} is not a JSON object")
    return value


def check_kind(what: str, found: Any, expected: str) -> None:
    """FormatError unless a record's ``kind`` field is ``expected`` (another tool's file under the same name)."""
    if found != expected:
        raise FormatError(f"{what} is not a {expected} record (kind {found!r})")
