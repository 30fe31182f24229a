"""A small progress bar on stderr (no dependency): rate and time left for long work.

On a terminal it redraws one line; in a log file it writes a line every 10% so logs stay short.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, desc: str, total: int | None = None, unit: str = "rows", enabled: bool = True, stream=None):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if not self.enabled:
            return
        if self._tty:
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self.stream.write("\r" + self._line(now))
                self.stream.flush()
        elif self.total:
            decile = int(10 * self.done / self.total)
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(self._line(now) + "\n")

    def _line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            frac = min(self.done / self.total, 1.0)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            eta = f"{left:5.0f}s left" if left != float("inf") else "   ?s left"
            return f"{self.desc}: [{bar}] {100 * frac:5.1f}% {self.done:,}/{self.total:,} {self.unit} {_rate(rate)}/s {eta}"
        return f"{self.desc}: {self.done:,} {self.unit} {_rate(rate)}/s"

    def close(self) -> None:
        if self.enabled:
            now = time.monotonic()
            line = self._line(now) + f" in {now - self._start:.1f}s"
            self.stream.write(("\r" + line + "\n") if self._tty else line + "\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self.enabled and self._tty:
            self.stream.write("\n")


def _rate(r: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if r >= scale:
            return f"{r / scale:.1f}{unit}"
    return f"{r:.0f}"
