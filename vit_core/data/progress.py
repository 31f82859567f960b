"""Periodic progress lines with rate and ETA, for long conversions run from a terminal or
a Ray job (whose logs a progress bar would fill with carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`label: done/total unit (pct), rate unit/s, ETA` at most every `interval` seconds."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "samples",
        interval: float = 5.0,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.interval = interval
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.emit(note)

    def emit(self, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = _duration(eta) if eta != float("inf") else "?"
        extra = f", {note}" if note else ""
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta_text}{extra}",
            file=self.stream,
            flush=True,
        )

    def finish(self, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        extra = f", {note}" if note else ""
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit} in {_duration(elapsed)} "
            f"({self.done / max(elapsed, 1e-9):.1f} {self.unit}/s){extra}",
            file=self.stream,
            flush=True,
        )
