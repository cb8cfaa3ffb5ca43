"""Progress and throughput lines for long jobs (to stderr, so --json output stays clean)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Accumulates audio seconds and counters; prints a line at most every ``interval`` seconds.

    Example::

        p = Progress("decode")
        p.update(audio_seconds=30.0, segments=1, objects=1)
        p.finish()
    """

    def __init__(self, label: str, *, stream: TextIO | None = None, interval: float = 2.0, enabled: bool = True):
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.start = time.monotonic()
        self.audio_seconds = 0.0
        self.counters: dict[str, int] = {}
        self._last_print = 0.0
        self._printed_state: tuple | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, *, audio_seconds: float = 0.0, **counts: int) -> None:
        self.audio_seconds += audio_seconds
        for k, v in counts.items():
            self.counters[k] = self.counters.get(k, 0) + int(v)
        if time.monotonic() - self._last_print >= self.interval:
            self._print()

    def line(self) -> str:
        el = max(self.elapsed, 1e-9)
        hours = self.audio_seconds / 3600
        counts = ", ".join(f"{v} {k}" for k, v in self.counters.items())
        return (f"[{self.label}] {hours:.3f} h audio | {counts} | {el:.1f} s | "
                f"{hours / el:.4f} audio h/s ({self.audio_seconds / el:.0f}x real time)")

    def _state(self) -> tuple:
        return self.audio_seconds, tuple(sorted(self.counters.items()))

    def _print(self) -> None:
        self._last_print = time.monotonic()
        self._printed_state = self._state()
        if self.enabled:
            print(self.line(), file=self.stream, flush=True)

    def finish(self) -> None:
        """Print the totals, unless the last line already showed them."""
        if self._printed_state != self._state():
            self._print()
